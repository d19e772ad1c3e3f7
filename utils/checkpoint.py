"""Checkpoint reading: the authors' format and this project's, with or without wrapper prefixes.

The authors' files are ``{'net_state_dict', 'optimizer_state_dict', 'acc', 'epoch'}`` (SPEC section 7); their ILSVRC
files carry DataParallel's ``module.`` prefix. Everything is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
from typing import Union

import torch
import torch.nn as nn

from models.registry import _shape_mismatch, _shapes, infer_ranks, rank_flags

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def read_checkpoint(path: str, map_location: Union[str, torch.device] = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and a one-line error for missing or unreadable files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects we refuse to run
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    return obj


def extract_state_dict(obj: dict) -> dict:
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


def load_weights(model: nn.Module, checkpoint: Union[str, dict], map_location="cpu") -> dict:
    """Load weights into ``model`` strictly, from a path, a checkpoint dict or a state_dict.

    Returns the checkpoint dict (for ``acc``/``epoch``). When shapes do not match, the error names the rank flags the
    checkpoint was trained with (read off its shapes), or says the file belongs to another model.
    """
    obj = read_checkpoint(checkpoint, map_location) if isinstance(checkpoint, str) else checkpoint
    state = extract_state_dict(obj)
    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
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
