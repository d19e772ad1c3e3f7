"""Checkpoint file -> model: the one implementation, used by the eval scripts, resume, torch.hub and export.

Two formats are read, always with ``weights_only=True`` and onto any device: the authors' files
(``{'net_state_dict', 'optimizer_state_dict', 'acc', 'epoch'}``, SPEC section 7; their ILSVRC files carry
DataParallel's ``module.`` prefix) and this project's, which also record ``model``, ``dataset`` and ``model_kwargs``
(written by :mod:`utils.checkpoint`). Which model a file holds is what it records; for the authors' files the caller
names the model and the ranks are read off the tensor shapes (:func:`infer_ranks`). Every refusal is a
:class:`CheckpointError` whose message names the flags that fit the file.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn

from .registry import (DATASETS, RANK_ARGS, datasets_of, get_model, list_models, model_defaults, model_rank_args,
                       rank_flags)

_PREFIXES = ("module.", "_orig_mod.")
Source = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def read_checkpoint(path: Source, map_location: Union[str, torch.device] = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and a one-line error for missing or unreadable files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint (the file is empty)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects we refuse to run
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    return obj


def state_dict_of(obj: dict) -> dict:
    """The model weights from a checkpoint dict or a raw state_dict, without ``module.``/``_orig_mod.`` prefixes."""
    state = obj.get("net_state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no 'net_state_dict' and is not a state_dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``DataParallel``/``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def checkpoint_acc(obj: dict) -> Optional[float]:
    """The checkpoint's ``acc`` as a float (0-dim tensor or number in the authors' files), or None."""
    acc = obj.get("acc")
    if isinstance(acc, torch.Tensor) and acc.numel() == 1:
        return float(acc.item())
    if isinstance(acc, (int, float)) and not isinstance(acc, bool):
        return float(acc)
    return None


def check_identity(obj: dict, path: str, *, dataset: str, model: Optional[str] = None) -> None:
    """Refuse a checkpoint that records another dataset or model (the authors' files record neither: accepted)."""
    recorded_ds, recorded_model = obj.get("dataset"), obj.get("model")
    if recorded_ds is not None and recorded_ds != dataset:
        raise CheckpointError(f"checkpoint {path!r} was trained on {recorded_ds} ({recorded_model}), not {dataset}; "
                              f"use the {recorded_ds} scripts")
    if model is not None and recorded_model is not None and recorded_model != model:
        raise CheckpointError(f"checkpoint {path!r} holds a {recorded_model}, not a {model}; "
                              f"pass --model={recorded_model}")


# ---------------------------------------------------------------------------------------------------------------------
# Ranks from tensor shapes
# ---------------------------------------------------------------------------------------------------------------------

def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_mismatch(expected: dict, state: dict) -> str:
    """Why ``state`` cannot load into a model with these shapes ('' when it can)."""
    missing = [k for k in expected if k not in state]
    if missing:
        return f"{len(missing)} missing keys, e.g. {missing[0]!r}"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}"
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            return f"{k!r} has shape {tuple(state[k].shape)}, the model expects {shape}"
    return ""


def infer_ranks(name: str, dataset: str, state: dict) -> dict:
    """Read the rank arguments of ``name`` off a (prefix-free) state_dict's tensor shapes.

    Model-agnostic: every rank-dependent dimension is an affine function of the ranks, so building the model at two
    rank values per argument shows which tensor dimension moves with it and by how much; the checkpoint's value of
    that dimension then gives the rank. The result is verified by comparing every shape.

    Raises:
        ValueError: the checkpoint does not fit ``name`` at any ranks (with the first mismatching key).
    """
    base = model_defaults(name, dataset)
    ref = _shapes(get_model(name, dataset, **base))
    ranks = dict(base)
    for arg, step in base.items():  # probe at twice the default: valid for grouped bases too
        moved = _shapes(get_model(name, dataset, **{**base, arg: base[arg] + step}))
        for key, shape in ref.items():
            dims = [i for i, (a, b) in enumerate(zip(shape, moved[key])) if a != b]
            if dims and key in state and len(state[key].shape) == len(shape):
                i = dims[0]
                slope, offset = moved[key][i] - shape[i], shape[i]
                value, rest = divmod((state[key].shape[i] - offset) * step, slope)
                if rest == 0 and base[arg] + value > 0:
                    ranks[arg] = base[arg] + value
                break
    problem = _shape_mismatch(_shapes(get_model(name, dataset, **ranks)), state)
    if problem:
        raise ValueError(f"checkpoint does not match {name} ({dataset}) at any ranks: {problem}")
    return ranks


def guess_model_flags(dataset: str, state: dict) -> Optional[str]:
    """``--model=<name> <rank flags>`` of the first registered ``dataset`` model whose keys and shapes fit ``state``
    (prefix-free), or None. Builds each candidate whose key set matches, so it costs a few model constructions."""
    keys = set(state)
    for name in list_models(dataset):
        try:
            if set(get_model(name, dataset).state_dict()) != keys:
                continue
            ranks = infer_ranks(name, dataset, state)
        except ValueError:
            continue
        return f"--model={name} {rank_flags(ranks)}".strip()
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

def load_weights(model: nn.Module, checkpoint: Union[Source, dict], map_location="cpu") -> dict:
    """Load weights into ``model`` (wrappers allowed) strictly, from a path, a checkpoint dict or a state_dict.

    Returns the checkpoint dict (for ``acc``/``epoch``). When shapes do not match, the error names the rank flags the
    checkpoint was trained with (read off its shapes), or says the file belongs to another model.
    """
    obj = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, map_location)
    state = state_dict_of(obj)
    target = unwrap_model(model)
    problem = _shape_mismatch(_shapes(target), state)
    if problem:
        raise CheckpointError(_explain_mismatch(target, state, problem))
    target.load_state_dict(state, strict=True)
    return obj


def _explain_mismatch(model: nn.Module, state: dict, problem: str) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return f"checkpoint does not fit this model: {problem}"
    try:
        ranks = infer_ranks(cfg.name, cfg.dataset, state)
    except ValueError:
        return (f"checkpoint is not a {cfg.dataset} {cfg.name} ({problem}); check --model and the dataset "
                f"the checkpoint was trained on")
    return (f"checkpoint was trained with {rank_flags(ranks)} but the model was built with "
            f"{rank_flags(cfg.build_kwargs())}; pass {rank_flags(ranks)}")


def _model_name(ckpt: dict, path: str, model: Optional[str], dataset: str, state: dict) -> str:
    recorded = ckpt.get("model")
    if model is not None and recorded is not None and model != recorded:
        flags = f"--model={recorded} {rank_flags(ckpt.get('model_kwargs') or {})}".strip()
        raise CheckpointError(f"checkpoint {path!r} holds a {recorded}, not a {model}; pass {flags}")
    if model is None and recorded is None:
        guess = guess_model_flags(dataset, state)
        hint = f" (the file fits {guess})" if guess else ""
        raise CheckpointError(f"checkpoint {path!r} records no model (an authors' file?): give the model{hint}")
    return model or recorded


def _file_ranks(ckpt: dict, path: str, name: str, dataset: str, state: dict, given: dict) -> tuple[dict, bool]:
    """The ranks of the file: recorded, else the caller's when they all fit, else read off the shapes."""
    takes = model_rank_args(name, dataset)
    recorded = ckpt.get("model_kwargs")
    if isinstance(recorded, dict):
        recorded = {k: v for k, v in recorded.items() if k in takes}
        if recorded and _mismatch_at_default_cost(name, dataset, recorded, state):  # never build what the record says
            try:  # unchecked: a wrong record (or a hostile one, 10**7) would allocate gigabytes
                actual = rank_flags(infer_ranks(name, dataset, state))
            except ValueError:
                actual = "other shapes"
            raise CheckpointError(f"checkpoint {path!r} records {rank_flags(recorded)} but its tensors hold {actual}: "
                                  f"its recorded model_kwargs are wrong, so it cannot be loaded as it is")
        return recorded, False
    if given.keys() == set(takes) and not _mismatch_at(name, dataset, given, state):
        return dict(given), False  # every rank given and the shapes fit: no need to probe
    try:
        return infer_ranks(name, dataset, state), bool(takes)
    except ValueError:
        guess = guess_model_flags(dataset, state)
        hint = f"; the file fits {guess}" if guess else "; check --model and the dataset it was trained on"
        raise CheckpointError(f"checkpoint {path!r} is not a {dataset} {name} at any ranks{hint}") from None


def _mismatch_at_default_cost(name: str, dataset: str, ranks: dict, state: dict) -> bool:
    """Whether ``ranks`` disagree with the shapes, checked from the shapes alone (builds only default-size models)."""
    try:
        inferred = infer_ranks(name, dataset, state)
    except ValueError:
        return True
    return any(inferred.get(k) != v for k, v in ranks.items())


def _mismatch_at(name: str, dataset: str, ranks: dict, state: dict) -> str:
    try:
        return _shape_mismatch(_shapes(get_model(name, dataset, **ranks)), state)
    except ValueError as e:
        return str(e)


def resolve_model(ckpt: dict, path: str, *, model: Optional[str] = None, dataset: Optional[str] = None,
                  shared_rank: Optional[int] = None, unique_rank: Optional[int] = None) -> tuple[nn.Module, bool]:
    """The model (freshly built, weights not loaded) that ``ckpt`` holds; see :func:`load_model`.

    Returns:
        ``(model, inferred)``: ``inferred`` is True when the ranks were read off the tensor shapes.
    """
    state = state_dict_of(ckpt)
    if dataset is not None:
        check_identity(ckpt, path, dataset=dataset)
    dataset = dataset or ckpt.get("dataset")
    if dataset is None:
        raise CheckpointError(f"checkpoint {path!r} records no dataset (an authors' file?): give the dataset "
                              f"({', '.join(DATASETS)})")
    name = _model_name(ckpt, path, model, dataset, state)
    try:
        takes = model_rank_args(name, dataset)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from None
    given = {k: v for k, v in zip(RANK_ARGS, (shared_rank, unique_rank)) if v is not None and k in takes}
    ranks, inferred = _file_ranks(ckpt, path, name, dataset, state, given)
    wrong = {k: v for k, v in given.items() if ranks.get(k) != v}
    if wrong:
        raise CheckpointError(f"checkpoint {path!r} was trained with {rank_flags(ranks)}, not {rank_flags(wrong)}; "
                              f"pass {rank_flags(ranks)}")
    try:
        return get_model(name, dataset, **ranks), inferred
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot build {name} with {rank_flags(ranks)}: {e}") from None


def load_model(path: Source, *, model: Optional[str] = None, dataset: Optional[str] = None,
               shared_rank: Optional[int] = None, unique_rank: Optional[int] = None,
               map_location: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the right model from a checkpoint file alone and load its weights (strictly).

    This project's files record ``model``, ``dataset`` and ``model_kwargs``: nothing else is needed. The authors'
    four-key files (and raw state_dicts) record nothing: ``model`` and ``dataset`` are then required, and the ranks are
    read off the tensor shapes. Arguments that are given must agree with what the file records or what its shapes
    say; otherwise the error names the flags that fit the file, e.g. ``... pass --model=ResNet32_DoubleShared
    --shared_rank=1 --unique_rank=1``. A rank the model does not take is ignored, as the training scripts ignore it.

    Returns:
        ``(model, checkpoint_dict)``: the model (in eval mode) and the file's dict (``acc``, ``epoch``, ...).

    Raises:
        CheckpointError: unreadable file, another dataset or model, ranks that disagree, shapes that fit nothing.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path, map_location)
    net, _ = resolve_model(ckpt, path, model=model, dataset=dataset, shared_rank=shared_rank, unique_rank=unique_rank)
    load_weights(net, ckpt)
    return net.eval(), ckpt


def build_model(name: str, dataset: Optional[str] = None, *, shared_rank: Optional[int] = None,
                unique_rank: Optional[int] = None, num_classes: Optional[int] = None,
                checkpoint: Union[Source, dict, None] = None) -> nn.Module:
    """Build registered model ``name`` and, when ``checkpoint`` is given, load its weights (the hub's entry points).

    Args:
        name: the paper's model name, e.g. ``"ResNet56_DoubleShared"``.
        dataset: may be omitted when ``name`` exists for one dataset only, or when the checkpoint records it.
        shared_rank, unique_rank: ranks; each one not given is taken from the checkpoint (recorded, else read off its
            shapes), else the model's default.
        num_classes: another class count (a new head); refused with a checkpoint, which fixes the head.
        checkpoint: local path, or an already loaded checkpoint dict / state_dict, in either format.

    Returns:
        the model, in the mode ``nn.Module`` starts in (train): call ``.eval()`` before predicting.

    Raises:
        ValueError: unknown name, a dataset that is missing or ambiguous, ranks the model does not take.
        CheckpointError: unreadable file, a file of another model or dataset, or shapes that do not fit.
    """
    registered = datasets_of(name)
    if not registered:
        raise ValueError(f"unknown model {name!r}; registered names: "
                         f"{', '.join(sorted({n.split('/')[1] for n in list_models()}))}")
    obj, where = None, "checkpoint"
    if checkpoint is not None:
        obj = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
        where = where if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    recorded = obj.get("dataset") if obj is not None and isinstance(obj.get("dataset"), str) else None
    dataset = dataset or recorded or (registered[0] if len(registered) == 1 else None)
    if dataset is None:
        raise ValueError(f"{name} exists for {' and '.join(registered)}: pass dataset= one of them")
    if obj is None:
        return get_model(name, dataset, shared_rank=shared_rank, unique_rank=unique_rank, num_classes=num_classes)
    if num_classes is not None:
        raise ValueError("num_classes builds a new head; a checkpoint fixes the head it was trained with")
    model, _ = resolve_model(obj, where, model=name, dataset=dataset, shared_rank=shared_rank, unique_rank=unique_rank)
    load_weights(model, obj)
    return model.train()
