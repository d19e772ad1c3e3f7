"""Shared-filter-basis ConvNets ("Learning Deeply Shared Filter Bases for Efficient ConvNets").

Importing it registers every model: ``get_model("ResNet56_DoubleShared", dataset="cifar10", shared_rank=16,
unique_rank=1)``; ``load_model("checkpoint.pth")`` rebuilds a checkpoint's model. It imports nothing from ``utils``.
"""

from . import bottleneck, densenet, mobilenetv2, resnet, resnext  # noqa: F401  (importing registers their models)
from .basis import BasisCfg, BasisPosition, SharedBasisConv2d, basis_conv2d, basis_groups, set_fused
from .folding import fold
from .pretrained import load_model
from .registry import DATASETS, ModelCfg, canonical_name, get_model, list_models, model_rank_args, unknown_model
from .regularizer import OrthogonalityRegularizer, orthogonality_penalty

__all__ = [
    "BasisCfg",
    "BasisPosition",
    "DATASETS",
    "ModelCfg",
    "OrthogonalityRegularizer",
    "SharedBasisConv2d",
    "basis_conv2d",
    "basis_groups",
    "canonical_name",
    "fold",
    "get_model",
    "list_models",
    "load_model",
    "model_rank_args",
    "orthogonality_penalty",
    "set_fused",
    "unknown_model",
]
