"""Checkpoint reading: the authors' format and this project's, with or without wrapper prefixes.

The authors' files are ``{'net_state_dict', 'optimizer_state_dict', 'acc', 'epoch'}`` (SPEC section 7); their ILSVRC
files carry DataParallel's ``module.`` prefix. Everything is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from models.registry import _shape_mismatch, _shapes, get_model, infer_ranks, list_models, model_rank_args, rank_flags

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def read_checkpoint(path: str, map_location: Union[str, torch.device] = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and a one-line error for missing or unreadable files."""
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


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """Why ``state`` (prefix-free) cannot be loaded strictly into ``model``: '' when it can."""
    return _shape_mismatch(_shapes(unwrap_model(model)), state)


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


# ---------------------------------------------------------------------------------------------------------------------
# Rebuilding the model from a file
# ---------------------------------------------------------------------------------------------------------------------

def load_model(path: str, *, model: Optional[str] = None, dataset: Optional[str] = None,
               shared_rank: Optional[int] = None, unique_rank: Optional[int] = None,
               map_location: Union[str, torch.device] = "cpu"):
    """Rebuild the right model from a checkpoint file alone and load its weights (strictly).

    This project's files record ``model``, ``dataset`` and ``model_kwargs``: nothing else is needed. The authors'
    four-key files (and raw state_dicts) record nothing: ``model`` and ``dataset`` are then required, and the ranks are
    read off the tensor shapes (:func:`models.registry.infer_ranks`). Arguments that are given must agree with what
    the file records or what its shapes say; otherwise the error names the flags that fit the file, e.g.
    ``... pass --model=ResNet32_DoubleShared --shared_rank=1 --unique_rank=1``. A rank the model does not take (e.g.
    ``unique_rank`` for a ``SharedOnly`` model) is ignored, as the training scripts ignore it.

    Returns:
        ``(model, checkpoint_dict)``: the model (in eval mode, on CPU) and the file's dict (``acc``, ``epoch``, ...).

    Raises:
        CheckpointError: unreadable file, another dataset or model, ranks that disagree, shapes that fit nothing.
    """
    ckpt = read_checkpoint(path, map_location)
    net, _ = resolve_model(ckpt, path, model=model, dataset=dataset, shared_rank=shared_rank,
                           unique_rank=unique_rank)
    load_weights(net, ckpt)
    return net.eval(), ckpt


def resolve_model(ckpt: dict, path: str, *, model: Optional[str] = None, dataset: Optional[str] = None,
                  shared_rank: Optional[int] = None, unique_rank: Optional[int] = None):
    """The model (freshly built, weights not loaded) that ``ckpt`` holds; see :func:`load_model`.

    Returns:
        ``(model, inferred)``: ``inferred`` is True when the ranks were read off the tensor shapes.
    """
    state = extract_state_dict(ckpt)
    if dataset is not None:
        check_identity(ckpt, path, dataset=dataset)
    dataset = dataset or ckpt.get("dataset")
    if dataset is None:
        raise CheckpointError(f"checkpoint {path!r} records no dataset (an authors' file?): give the dataset "
                              f"(cifar10, cifar100 or ilsvrc)")
    recorded_model = ckpt.get("model")
    recorded = ckpt.get("model_kwargs")
    if model is not None and recorded_model is not None and model != recorded_model:
        flags = f"--model={recorded_model} {rank_flags(recorded or {})}".strip()
        raise CheckpointError(f"checkpoint {path!r} holds a {recorded_model}, not a {model}; pass {flags}")
    name = model or recorded_model
    if name is None:
        guess = guess_model_flags(dataset, state)
        hint = f" (the file fits {guess})" if guess else ""
        raise CheckpointError(f"checkpoint {path!r} records no model (an authors' file?): give the model{hint}")
    try:
        takes = model_rank_args(name, dataset)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from None
    given = {k: v for k, v in (("shared_rank", shared_rank), ("unique_rank", unique_rank))
             if v is not None and k in takes}
    inferred = False
    if isinstance(recorded, dict):
        ranks = {k: v for k, v in recorded.items() if k in takes}
    elif given.keys() == set(takes) and not _mismatch_at(name, dataset, given, state):
        ranks = dict(given)  # every rank given and the shapes fit: no need to probe
    else:
        try:
            ranks = infer_ranks(name, dataset, state)
        except ValueError:
            guess = guess_model_flags(dataset, state)
            hint = f"; the file fits {guess}" if guess else "; check --model and the dataset it was trained on"
            raise CheckpointError(f"checkpoint {path!r} is not a {dataset} {name} at any ranks{hint}") from None
        inferred = bool(takes)
    wrong = {k: v for k, v in given.items() if ranks.get(k) != v}
    if wrong:
        raise CheckpointError(f"checkpoint {path!r} was trained with {rank_flags(ranks)}, not {rank_flags(wrong)}; "
                              f"pass {rank_flags(ranks)}")
    try:
        net = get_model(name, dataset, **ranks)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot build {name} with {rank_flags(ranks)}: {e}") from None
    return net, inferred


def _mismatch_at(name: str, dataset: str, ranks: dict, state: dict) -> str:
    try:
        return _shape_mismatch(_shapes(get_model(name, dataset, **ranks)), state)
    except ValueError as e:
        return str(e)


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
# Writing and resuming (this project's format)
# ---------------------------------------------------------------------------------------------------------------------
#
# A checkpoint is the authors' four keys plus what resuming and rebuilding need; every value is something
# ``torch.load(weights_only=True)`` can read (tensors, numbers, strings, None, lists/tuples/dicts of those):
#
#   net_state_dict        unwrapped model state_dict (no ``module.``/``_orig_mod.``), tensors on CPU
#   optimizer_state_dict  SGD state (momentum buffers on CPU)
#   acc                   test top-1 of the saved epoch, percent, 0-dim float32 CPU tensor (authors' key)
#   epoch                 1-based epoch of the save (authors' key); resuming starts at epoch + 1
#   format_version        FORMAT_VERSION
#   model, dataset        registry name and dataset
#   model_kwargs          the rank keywords the model was built with (``ModelCfg.build_kwargs()``)
#   args                  the run's resolved arguments, a plain dict
#   acc5, best_acc, best_acc5, best_epoch, stage, scaler_state_dict, rng_state

FORMAT_VERSION = 1


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``DataParallel``/``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), numpy and Python ``random``, in weights_only-safe types."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Optional[dict]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    import random

    import numpy as np

    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one, never a mix.

    The bytes go to a temporary file in the same directory, are flushed and fsync'ed, and the temporary file is then
    ``os.replace``d onto ``path``. On any failure (full disk, interrupt) the temporary file is removed and ``path`` is
    untouched.
    """
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the file the permissions open() would
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def serialize(obj) -> bytes:
    """``torch.save`` into memory (so one serialisation can be written to several files)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(obj: dict, path: Union[str, Sequence[str]]) -> None:
    """Atomically write ``obj`` (tensors moved to CPU) to one path or to each of several paths."""
    data = serialize(_to_cpu(obj))
    for p in [path] if isinstance(path, str) else path:
        atomic_write_bytes(data, p)


def make_checkpoint(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, epoch: int, acc: float,
                    **extra) -> dict:
    """The checkpoint dict for ``model`` (unwrapped) at ``epoch`` with test top-1 ``acc`` (percent).

    ``extra`` adds this project's keys (``acc5``, ``best_acc``, ``args``, ``stage``, ...); ``model``, ``dataset`` and
    ``model_kwargs`` are filled in from ``model.cfg`` when the model has one.
    """
    bare = unwrap_model(model)
    ckpt = {
        "net_state_dict": bare.state_dict(),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "acc": torch.tensor(float(acc), dtype=torch.float32),
        "epoch": int(epoch),
        "format_version": FORMAT_VERSION,
    }
    cfg = getattr(bare, "cfg", None)
    if cfg is not None:
        ckpt.update(model=cfg.name, dataset=cfg.dataset, model_kwargs=dict(cfg.build_kwargs()))
    ckpt.update(extra)
    if isinstance(ckpt.get("args"), dict):
        ckpt["args"] = _plain(ckpt["args"])
    return ckpt


def _plain(value):
    """Arguments as weights_only-safe builtins (paths and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


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
