"""Shared-filter-basis ConvNets ("Learning Deeply Shared Filter Bases for Efficient ConvNets").

Importing this package registers every model of the paper::

    from models import get_model, list_models
    net = get_model("ResNet56_DoubleShared", dataset="cifar10", shared_rank=16, unique_rank=1)
"""
from . import resnet  # noqa: F401  (registers the ResNets)
from . import densenet  # noqa: F401  (registers DenseNet121*)
from . import resnext  # noqa: F401  (registers ResNext50*)
from . import mobilenetv2  # noqa: F401  (registers MobileNetV2*)
from .fold import fold
from .basis import BasisPosition, SharedBasisConv2d, basis_conv2d, set_fused
from .registry import DATASETS, ModelCfg, get_model, list_models, model_rank_args
from .regularizer import OrthogonalityRegularizer, orthogonality_penalty

__all__ = ["BasisPosition", "DATASETS", "ModelCfg", "OrthogonalityRegularizer", "SharedBasisConv2d", "basis_conv2d", "fold",
           "get_model", "list_models", "model_rank_args", "orthogonality_penalty", "set_fused"]
