"""Model registry: the paper's ``--model`` names per dataset, and every decision about ranks.

Names are the reference scripts' (users type them from the paper's README), so one name can mean different networks
on different datasets (``ResNet34`` on CIFAR-100 and ILSVRC): the registry is keyed by ``(dataset, name)``. A name's
suffix is its variant (:data:`VARIANTS`); this module alone decides the ranks a model takes, their defaults and bounds.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch.nn as nn

from .basis import BasisCfg

DATASETS = ("cifar10", "cifar100", "ilsvrc")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "ilsvrc": 1000}
INPUT_SIZE = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "ilsvrc": (3, 224, 224)}
RANK_ARGS = ("shared_rank", "unique_rank")
DEFAULT_RANKS = {"shared_rank": 16, "unique_rank": 1}  # the authors' scripts' defaults
# Variants by name suffix (plain names have none): (shared bases per group, rank keywords taken, torch.hub's help).
# The later ones (SPEC_v2) share whole convs and take no ranks; ResNet50/101_Shared registers 2 bases per group.
VARIANTS = {
    "DoubleShared": (2, RANK_ARGS, "two shared filter bases per group (one per conv position) plus unique filters"),
    "SingleShared": (1, RANK_ARGS, "one shared filter basis per group plus unique filters"),
    "SharedOnly": (2, ("shared_rank",), "shared filter bases only (no unique filters)"),
    "NonShared": (0, ("unique_rank",), "per-layer bases only (the no-sharing ablation)"),
    "Shared": (
        1,
        (),
        "shared whole convs (MobileNetV2: 1x1 expansions; ResNet50/101: 3x3 and 1x1 expansions, README Shared++)",
    ),
    "SharedSingle": (1, (), "a shared whole 3x3 conv per layer (README Shared)"),
    "SharedDouble": (2, (), "shared 1x1 expansion and projection convs (README Shared++; ILSVRC: with ECA attention)"),
    "SharedDouble_NoECA": (2, (), "shared 1x1 expansion and projection convs, the November 2020 layout without ECA"),
}
# Older published layouts of a model, tried in order when a checkpoint's keys do not fit the model's own (SPEC_v2 8.4).
LAYOUTS = {("ilsvrc", "MobileNetV2_SharedDouble"): ("MobileNetV2_SharedDouble_NoECA",)}
# The ranks the paper trained a model with where the scripts' defaults (16/1) cannot build it (used in errors).
PAPER_RANKS = {"ResNext50_SingleShared": "--shared_rank=64 --unique_rank=4"}
KERNEL_AREA = 9  # a 3x3 basis over C channels is full rank at 9C filters: the bound on ranks (more builds nothing new)


@dataclass(frozen=True)
class ModelCfg:
    """What a built model is; attached as ``model.cfg`` and stored in checkpoints (as a plain dict)."""

    dataset: str
    name: str
    shared_rank: int | None = None
    unique_rank: int | None = None
    num_classes: int = 10
    input_size: tuple = (3, 32, 32)

    def build_kwargs(self) -> dict:
        """The keyword arguments that rebuild this model with :func:`get_model`."""
        return {k: getattr(self, k) for k in RANK_ARGS if getattr(self, k) is not None}


class _Entry(NamedTuple):
    builder: Callable[..., nn.Module]  # builder(num_classes=..., basis=Optional[BasisCfg])
    bases_per_group: int | None  # None: a plain model
    rank_multiple: int  # grouped bases need ranks that are multiples of this
    max_rank: int  # KERNEL_AREA * input channels of the group-1 bases
    defaults: dict  # each rank keyword this model takes, in order, with its default


_REGISTRY: dict[tuple[str, str], _Entry] = {}


def register_model(
    dataset: str,
    name: str,
    *,
    channels: int = 0,
    rank_multiple: int = 1,
    bases_per_group: int | None = None,
    **defaults,
):
    """Decorator: register ``builder(num_classes=..., basis=...)`` as ``name`` for ``dataset``; ``channels`` (of the
    group-1 bases) bound the ranks; ``bases_per_group`` overrides the variant's; ``defaults``: other rank defaults."""
    _check_dataset(dataset)
    suffix = name.split("_", 1)[1] if "_" in name else None
    if suffix is not None and suffix not in VARIANTS:
        raise ValueError(f"model {name!r}: unknown variant {suffix!r}; variants: {', '.join(VARIANTS)}")
    bases, rank_args, _ = VARIANTS[suffix] if suffix else (None, (), "")
    if set(defaults) - set(rank_args):
        raise ValueError(f"{name} does not take {', '.join(sorted(set(defaults) - set(rank_args)))}")
    if rank_args and channels <= 0:
        raise ValueError(f"{name} takes ranks: register it with the channels its group-1 bases see")
    bases = bases if bases_per_group is None else bases_per_group
    defaults = {k: defaults.get(k, DEFAULT_RANKS[k]) for k in rank_args}

    def wrap(builder):
        if (dataset, name) in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered for {dataset}")
        _REGISTRY[(dataset, name)] = _Entry(builder, bases, rank_multiple, KERNEL_AREA * channels, defaults)
        return builder

    return wrap


def list_models(dataset: str | None = None, pattern: str = "*") -> list[str]:
    """Registered names for ``dataset`` (all datasets when None, as ``dataset/name``), filtered by a glob pattern."""
    if dataset is None:
        return sorted(f"{d}/{n}" for d, n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    _check_dataset(dataset)
    return sorted(n for d, n in _REGISTRY if d == dataset and fnmatch.fnmatch(n, pattern))


def datasets_of(name: str) -> list[str]:
    """The datasets ``name`` is registered for, in :data:`DATASETS` order."""
    return [d for d in DATASETS if (d, canonical_name(name)) in _REGISTRY]


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")


def canonical_name(name: str) -> str:
    """The registered spelling of ``name``: the authors' README also writes ``ResNet56-DoubleShared``, and a name
    that differs from one registered name only in case (``Resnet56_doubleshared``) means that name."""
    name = name.replace("-", "_")
    if any(n == name for _, n in _REGISTRY):
        return name
    same = {n for _, n in _REGISTRY if n.lower() == name.lower()}
    return same.pop() if len(same) == 1 else name


def unknown_model(name: str, dataset: str | None = None) -> str:
    """One line for a name not registered (for ``dataset``): the closest valid name first, then all of them."""
    valid = list_models(dataset) if dataset else sorted({n.split("/")[1] for n in list_models()})
    close = difflib.get_close_matches(canonical_name(name), valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = f" for {dataset}" if dataset else ""
    return f"unknown model {name!r}{where}{hint}; valid names: {', '.join(valid)}"


def _entry(name: str, dataset: str) -> _Entry:
    _check_dataset(dataset)
    try:
        return _REGISTRY[(dataset, canonical_name(name))]
    except KeyError:
        raise ValueError(unknown_model(name, dataset)) from None


def model_rank_args(name: str, dataset: str) -> tuple:
    """The rank keywords ``name`` takes on ``dataset`` (empty for plain models and MobileNetV2_Shared)."""
    return tuple(_entry(name, dataset).defaults)


def model_defaults(name: str, dataset: str) -> dict:
    """The default of each rank keyword ``name`` takes on ``dataset``."""
    return dict(_entry(name, dataset).defaults)


def check_rank_type(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_ranks(name: str, entry: _Entry, ranks: dict) -> None:
    for k, v in ranks.items():
        check_rank_type(k, v)
        if v > entry.max_rank:  # before anything is allocated
            raise ValueError(
                f"{k}={v} is too large for {name} (at most {entry.max_rank}: a 3x3 basis over the "
                f"{entry.max_rank // KERNEL_AREA} channels of group 1 is full rank there)"
            )
        if v % entry.rank_multiple:
            raise ValueError(
                f"{name} uses grouped bases of {entry.rank_multiple} filters per group, so {k} must be "
                f"a multiple of {entry.rank_multiple} (got {v})"
            )


def get_model(
    name: str,
    dataset: str,
    *,
    shared_rank: int | None = None,
    unique_rank: int | None = None,
    num_classes: int | None = None,
    ignore_unused_ranks: bool = False,
) -> nn.Module:
    """Build a registered model (the paper's ``--model`` name) with ``model.cfg``. ValueError: unknown names, ranks
    that cannot build, and ranks the model does not take unless ``ignore_unused_ranks`` (as the scripts do)."""
    entry = _entry(name, dataset)
    name = canonical_name(name)
    given = {k: v for k, v in zip(RANK_ARGS, (shared_rank, unique_rank)) if v is not None}
    extra = [k for k in given if k not in entry.defaults]
    if extra and not ignore_unused_ranks:
        takes = ", ".join(entry.defaults) if entry.defaults else "no rank arguments"
        raise ValueError(f"{name} ({dataset}) does not take {', '.join(extra)}; it takes {takes}")
    ranks = {k: given.get(k, default) for k, default in entry.defaults.items()}
    classes = NUM_CLASSES[dataset] if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        _check_ranks(name, entry, ranks)
        basis = None if entry.bases_per_group is None else BasisCfg(entry.bases_per_group, **ranks)
        model = entry.builder(num_classes=classes, basis=basis)
    except ValueError as e:
        if name not in PAPER_RANKS:
            raise
        raise ValueError(f"{e} (the paper's {name} was trained with {PAPER_RANKS[name]})") from None
    model.cfg = ModelCfg(
        dataset=dataset,
        name=name,
        num_classes=classes,
        input_size=INPUT_SIZE[dataset],
        **{k: ranks.get(k) for k in RANK_ARGS},
    )
    return model


def rank_flags(ranks: dict) -> str:
    """``{'shared_rank': 32, 'unique_rank': 1}`` -> ``'--shared_rank=32 --unique_rank=1'``."""
    return " ".join(f"--{k}={v}" for k, v in ranks.items())


# How errors name arguments: None = Python keywords (``model="X", shared_rank=16``, the default for notebooks and hub);
# "flags" = command-line flags of a tool with a --dataset flag (models.export); "scripts" = the six scripts' flags,
# where the dataset is the script's.
_WORDING: contextvars.ContextVar = contextvars.ContextVar("wording", default=None)


@contextlib.contextmanager
def flag_wording(kind: str = "scripts"):
    """Inside, :func:`spell_args` (and so every checkpoint error) names command-line flags instead of keywords."""
    if kind not in ("flags", "scripts"):
        raise ValueError(f"flag_wording: kind must be 'flags' or 'scripts', got {kind!r}")
    token = _WORDING.set(kind)
    try:
        yield
    finally:
        _WORDING.reset(token)


def spell_args(args: dict) -> str:
    """``args`` as the user would type them here: ``dataset="cifar10", model="X", shared_rank=16`` in Python,
    ``--dataset=cifar10 --model=X --shared_rank=16`` for models.export, ``--model=X --shared_rank=16 with the cifar10
    scripts`` for the scripts (whose dataset is the script's)."""
    wording = _WORDING.get()
    if wording is None:
        return ", ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v!r}" for k, v in args.items())
    if wording == "flags" or "dataset" not in args:
        return " ".join(f"--{k}={v}" for k, v in args.items())
    flags = " ".join(f"--{k}={v}" for k, v in args.items() if k != "dataset")
    return f"{flags} with the {args['dataset']} scripts" if flags else f"the {args['dataset']} scripts"
