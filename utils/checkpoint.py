"""Checkpoint writing: atomic saves, the checkpoint dict, RNG state for exact resumes (reading: models.pretrained)."""

from __future__ import annotations

import fcntl
import glob
import io
import json
import os
import random
from collections.abc import Sequence
from typing import IO

import numpy as np
import torch
import torch.nn as nn

from models.atomic import atomic_path, atomic_write_bytes  # noqa: F401  (atomic_write_bytes: part of this API)
from models.pretrained import FORMAT_VERSION, unwrap_model
from utils.engine import RunError

# Every value loads under weights_only=True. The authors' keys: net_state_dict (unwrapped, CPU), optimizer_state_dict,
# acc (test top-1 %, 0-dim float32), epoch (1-based; resume at epoch + 1). Ours: format_version, model, dataset,
# model_kwargs (ModelCfg.build_kwargs()), args (plain dict), acc5, best_acc, best_acc5, best_epoch, stage,
# scaler_state_dict, rng_state.


def _to_cpu(obj, copies: dict):
    """CPU copies of the tensors in ``obj``; one under several keys (a shared basis) is copied, and stored, once."""
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
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict | None) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    state = state or {}
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


def save_checkpoint(obj: dict, path: str | Sequence[str]) -> None:
    """Atomically write ``obj`` (tensors moved to CPU) to one path or to each of several paths."""
    buffer = io.BytesIO()  # serialised once for all paths
    torch.save(_to_cpu(obj, {}), buffer)
    for p in [path] if isinstance(path, str) else path:
        with atomic_path(p) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:  # no extra frame
            f.write(buffer.getvalue())


def make_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, epoch: int, acc: float, **extra
) -> dict:
    """The checkpoint of ``model`` (unwrapped) at ``epoch`` with test top-1 ``acc`` (%); ``extra`` adds keys."""
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
    if isinstance(ckpt.get("args"), dict):  # weights_only-safe builtins: paths and other objects become strings
        ckpt["args"] = json.loads(json.dumps(ckpt["args"], default=str))
    return ckpt


def run_files_busy(out_dir: str, stem: str) -> bool:
    """Whether a live process holds ``.<stem>.lock`` (probed without creating anything)."""
    try:
        with open(os.path.join(out_dir, f".{stem}.lock")) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the file closes
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no run ever held it
        return False
    return False


def lock_run_files(out_dir: str, stem: str) -> IO:
    """Hold ``.<stem>.lock`` while the returned file is open (freed at any exit); remove a killed writer's tmp files."""
    os.makedirs(out_dir, exist_ok=True)
    handle = open(os.path.join(out_dir, f".{stem}.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunError(
            f"another process is writing the {stem} files in {out_dir!r} (it holds .{stem}.lock); "
            f"wait for it to end, or pass another --output_dir"
        ) from None
    for name in (f"{stem}.pth", f"{stem}-last.pth", f"{stem}-args.json", f"{stem}epoch*.pth"):
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), f".{name}.*.tmp")):
            os.unlink(tmp)
    return handle
