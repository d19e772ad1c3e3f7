"""Model registry: the paper's ``--model`` names, per dataset.

Names are the reference scripts' names (users type them from the paper's README), so one name can mean different
networks on different datasets (``ResNet34`` on CIFAR-100 vs ILSVRC); the registry is keyed by ``(dataset, name)``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch.nn as nn

DATASETS = ("cifar10", "cifar100", "ilsvrc")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "ilsvrc": 1000}
INPUT_SIZE = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "ilsvrc": (3, 224, 224)}
RANK_ARGS = ("shared_rank", "unique_rank")


@dataclass(frozen=True)
class ModelCfg:
    """What a built model is; attached as ``model.cfg`` and stored in checkpoints (as a plain dict)."""

    dataset: str
    name: str
    shared_rank: Optional[int] = None
    unique_rank: Optional[int] = None
    num_classes: int = 10
    input_size: tuple = (3, 32, 32)

    def build_kwargs(self) -> dict:
        """The keyword arguments that rebuild this model with :func:`get_model`."""
        return {k: v for k, v in asdict(self).items() if k in RANK_ARGS and v is not None}


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    rank_args: tuple  # the rank keywords this model takes, e.g. ("shared_rank", "unique_rank")
    rank_multiple: int = 1  # grouped bases need ranks that are multiples of this
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[tuple[str, str], _Entry] = {}


def register_model(dataset: str, name: str, *, rank_args: tuple = (), rank_multiple: int = 1, **defaults):
    """Decorator: register ``builder(**ranks)`` as ``name`` for ``dataset``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}")

    def wrap(builder):
        if (dataset, name) in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered for {dataset}")
        _REGISTRY[(dataset, name)] = _Entry(builder, tuple(rank_args), rank_multiple, dict(defaults))
        return builder

    return wrap


def list_models(dataset: Optional[str] = None, pattern: str = "*") -> list[str]:
    """Registered names for ``dataset`` (all datasets when None, as ``dataset/name``), filtered by a glob pattern."""
    if dataset is None:
        return sorted(f"{d}/{n}" for d, n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    _check_dataset(dataset)
    return sorted(n for d, n in _REGISTRY if d == dataset and fnmatch.fnmatch(n, pattern))


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")


def _entry(name: str, dataset: str) -> _Entry:
    _check_dataset(dataset)
    try:
        return _REGISTRY[(dataset, name)]
    except KeyError:
        raise ValueError(f"unknown model {name!r} for {dataset}; valid names: "
                         f"{', '.join(list_models(dataset))}") from None


def model_rank_args(name: str, dataset: str) -> tuple:
    """The rank keywords ``name`` takes on ``dataset`` (empty for plain models and MobileNetV2_Shared)."""
    return _entry(name, dataset).rank_args


def model_defaults(name: str, dataset: str) -> dict:
    return dict(_entry(name, dataset).defaults)


def get_model(name: str, dataset: str, *, shared_rank: Optional[int] = None, unique_rank: Optional[int] = None,
              num_classes: Optional[int] = None) -> nn.Module:
    """Build a registered model.

    Args:
        name: the paper's ``--model`` name, e.g. ``"ResNet56_DoubleShared"``.
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"ilsvrc"``.
        shared_rank, unique_rank: ranks, only for models that take them (None = the model's default).
        num_classes: override the dataset's class count (the checkpoints use the dataset's).

    Raises:
        ValueError: unknown name or dataset, a rank the model does not take, or ranks that cannot build.
    """
    entry = _entry(name, dataset)
    given = {"shared_rank": shared_rank, "unique_rank": unique_rank}
    extra = [k for k, v in given.items() if v is not None and k not in entry.rank_args]
    if extra:
        takes = ", ".join(entry.rank_args) if entry.rank_args else "no rank arguments"
        raise ValueError(f"{name} ({dataset}) does not take {', '.join(extra)}; it takes {takes}")
    ranks = {k: given[k] if given[k] is not None else entry.defaults[k] for k in entry.rank_args}
    for k, v in ranks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if v % entry.rank_multiple:
            raise ValueError(f"{name} uses grouped bases of {entry.rank_multiple} filters per group, so {k} must be "
                             f"a multiple of {entry.rank_multiple} (got {v})")
    classes = NUM_CLASSES[dataset] if num_classes is None else num_classes
    model = entry.builder(num_classes=classes, **ranks)
    model.cfg = ModelCfg(dataset=dataset, name=name, num_classes=classes, input_size=INPUT_SIZE[dataset],
                         **{k: ranks.get(k) for k in RANK_ARGS})
    return model


def infer_ranks(name: str, dataset: str, state_dict: dict) -> dict:
    """Read the rank arguments of ``name`` off a checkpoint's tensor shapes.

    Model-agnostic: every rank-dependent dimension is an affine function of the ranks, so building the model at two
    rank values per argument shows which tensor dimension moves with it and by how much; the checkpoint's value of
    that dimension then gives the rank. The result is verified by comparing every shape.

    Raises:
        ValueError: the checkpoint does not fit ``name`` at any ranks (with the first mismatching key).
    """
    entry = _entry(name, dataset)
    base = {k: entry.defaults[k] for k in entry.rank_args}
    ref = _shapes(get_model(name, dataset, **base))
    ranks = dict(base)
    for arg in entry.rank_args:
        step = base[arg]  # probe at twice the default: valid for grouped bases too (powers of two of the group)
        moved = _shapes(get_model(name, dataset, **{**base, arg: base[arg] + step}))
        for key, shape in ref.items():
            dims = [i for i, (a, b) in enumerate(zip(shape, moved[key])) if a != b]
            if dims and key in state_dict and len(state_dict[key].shape) == len(shape):
                i = dims[0]
                slope, offset = moved[key][i] - shape[i], shape[i]
                value, rest = divmod((state_dict[key].shape[i] - offset) * step, slope)
                if rest == 0 and base[arg] + value > 0:
                    ranks[arg] = base[arg] + value
                break
    expected = _shapes(get_model(name, dataset, **ranks))
    problem = _shape_mismatch(expected, state_dict)
    if problem:
        raise ValueError(f"checkpoint does not match {name} ({dataset}) at any ranks: {problem}")
    return ranks


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_mismatch(expected: dict, state_dict: dict) -> str:
    missing = [k for k in expected if k not in state_dict]
    if missing:
        return f"{len(missing)} missing keys, e.g. {missing[0]!r}"
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}"
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != shape:
            return f"{k!r} has shape {tuple(state_dict[k].shape)}, the model expects {shape}"
    return ""


def rank_flags(ranks: dict) -> str:
    """``{'shared_rank': 32, 'unique_rank': 1}`` -> ``'--shared_rank=32 --unique_rank=1'``."""
    return " ".join(f"--{k}={v}" for k, v in ranks.items())
