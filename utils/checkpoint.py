"""Checkpoint writing (this project's format): atomic saves, the checkpoint dict, RNG state for exact resumes.

Reading a checkpoint and rebuilding its model is :mod:`models.pretrained` (one implementation for eval, resume, hub
and export); the atomic writer is :mod:`models.atomic`, shared with the export.
"""
from __future__ import annotations

import fcntl
import glob
import os
from typing import IO, Optional, Sequence, Union

import torch
import torch.nn as nn

from models.atomic import atomic_write_bytes  # noqa: F401  (part of this module's API)
from models.pretrained import unwrap_model
from utils.engine import RunError

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


def _to_cpu(obj, copies: dict):
    """CPU copies of the tensors in ``obj``; a tensor reached under several keys (a shared basis) is copied once, so
    the file holds it once and loads it as one storage."""
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset())
        if key not in copies:
            copies[key] = obj.detach().cpu()
        return copies[key]
    if isinstance(obj, dict):
        return {k: _to_cpu(v, copies) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, copies) for v in obj)
    return obj


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


def serialize(obj) -> bytes:
    """``torch.save`` into memory (so one serialisation can be written to several files)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(obj: dict, path: Union[str, Sequence[str]]) -> None:
    """Atomically write ``obj`` (tensors moved to CPU) to one path or to each of several paths."""
    data = serialize(_to_cpu(obj, {}))
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


class OutputLocked(RunError):
    """Another live process is writing the same run's files."""


def lock_run_files(out_dir: str, stem: str) -> IO:
    """Hold ``out_dir/.<stem>.lock`` for as long as the returned file stays open: the kernel releases it when the
    process ends, however it ends, so a crashed run never leaves it stuck. Then remove the temporary files that a
    killed writer of this run left behind (no live process can be writing them now)."""
    os.makedirs(out_dir, exist_ok=True)
    handle = open(os.path.join(out_dir, f".{stem}.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutputLocked(f"another process is writing the {stem} files in {out_dir!r} (it holds .{stem}.lock); "
                           f"wait for it to end, or pass another --output_dir") from None
    for name in (f"{stem}.pth", f"{stem}-last.pth", f"{stem}-args.json", f"{stem}epoch*.pth"):
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), f".{name}.*.tmp")):
            os.unlink(tmp)
    return handle
