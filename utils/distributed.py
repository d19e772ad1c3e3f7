"""torchrun support: join the process group from the environment, rank helpers, reductions of metric tensors.

Without torchrun (or with ``WORLD_SIZE=1``) every function is the identity. Backend: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

SYNC_BN_DEVICES = ("cuda",)  # where nn.SyncBatchNorm runs (GPU-only kernels); CPU tests add "cpu" (cpu_sync_bn.py)


class DistError(RuntimeError):
    """A distributed set-up that cannot work (bad environment, device, batch size); the message is one line."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else None
    except ValueError:
        raise DistError(f"environment variable {name}={text!r} is not an integer (it is set by torchrun)") from None


def env_world_size() -> int:
    return _env_int("WORLD_SIZE") or 1


def init_from_env(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (no-op with one process); CUDA processes use ``cuda:LOCAL_RANK``."""
    global _INFO
    world = env_world_size()
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None or not 0 <= rank < world:
        raise DistError(
            f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or out of range: start multi-process "
            f"runs with torchrun"
        )
    kwargs = {}
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistError(
                f"LOCAL_RANK={local_rank} but this node sees only {torch.cuda.device_count()} CUDA "
                f"device(s): start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    waiting = threading.Timer(
        10.0,
        lambda: print(  # said only when the peers are late, by every rank that waits
            f"rank {rank}: waiting for the other {world - 1} process(es) of WORLD_SIZE={world} at {where} (gives up "
            f"after {timeout_s:.0f} s; start every rank with torchrun)",
            file=sys.stderr,
            flush=True,
        ),
    )
    waiting.daemon = True
    waiting.start()
    try:
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device_type == "cuda" else "gloo",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
                **kwargs,
            )
    finally:
        waiting.cancel()
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local_rank)
    return _INFO


def cleanup() -> None:
    """Leave the process group (safe when none was started, or when a peer is already gone)."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that died already released everything it could
            dist.destroy_process_group()
    _INFO = DistInfo()


def current() -> DistInfo:
    return _INFO


def is_main_process() -> bool:
    return _INFO.rank == 0


def _active() -> bool:
    return _INFO.enabled and dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place (``sum``, ``min`` or ``max``)."""
    if _active():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (so that all ranks stop at the same step)."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item())


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 (where the files are), its result -- or the error it raised -- on every rank."""
    if not _active():
        return fn()
    box = [None]
    if _INFO.is_main:
        try:
            box = [(fn(), None)]
        except Exception as e:  # noqa: BLE001  (raised again below, on every rank, so that none waits forever)
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not _active():
        return [obj]
    out = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``--sync_bn``: torch's converter keeps the parameter tensors, and aliased (shared) convs stay one module."""
    if torch.device(device).type not in SYNC_BN_DEVICES:
        raise DistError(
            f"--sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on {device}); drop --sync_bn"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
