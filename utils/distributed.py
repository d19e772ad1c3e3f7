"""Process-group helpers for training under ``torchrun`` (DistributedDataParallel, one process per GPU or CPU slot).

The training scripts detect ``torchrun`` from the environment it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without those variables (or with ``WORLD_SIZE=1``) everything here is a no-op and a
run is the single-process run it always was. Backend: NCCL on CUDA, gloo on CPU.

* :func:`init_from_env` / :func:`cleanup`: start and end the process group; :class:`DistInfo` says who we are.
* :func:`is_main_process`: rank 0 logs, prints, writes checkpoints and TensorBoard events.
* :func:`all_reduce_sum`: metric counters summed over ranks (exact top-1/top-5 over a sharded test set).
* :func:`broadcast_object`: rank 0 reads a file, every rank gets the object (so a checkpoint needs to exist only where
  rank 0 runs, and an unreadable file fails on every rank with the same message instead of hanging the others).
* :func:`convert_sync_batchnorm`: ``--sync_bn``; torch's ``nn.SyncBatchNorm`` on CUDA and :class:`CpuSyncBatchNorm`
  (same maths, differentiable all-reduces over gloo) on CPU, where torch's refuses to run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "env_world_size", "init_from_env", "cleanup", "current", "is_distributed", "is_main_process",
           "get_rank", "get_world_size", "barrier", "all_reduce_sum", "all_reduce_min", "broadcast_object",
           "all_gather_object", "convert_sync_batchnorm", "CpuSyncBatchNorm"]


class DistError(RuntimeError):
    """A distributed set-up that cannot work (bad environment, device, batch size); the message is one line."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def _env_int(name: str) -> Optional[int]:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise DistError(f"environment variable {name}={text!r} is not an integer (it is set by torchrun)") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    return _env_int("WORLD_SIZE") or 1


def init_from_env(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op outside torchrun or with one process).

    Args:
        device_type: ``"cuda"`` (NCCL, and ``torch.cuda.set_device(LOCAL_RANK)``) or ``"cpu"`` (gloo).
        timeout_s: collective timeout (a rank that died makes the others fail after this, not hang forever).
    """
    global _INFO
    world = env_world_size()
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise DistError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are not set: start multi-process runs with torchrun")
    if not 0 <= rank < world:
        raise DistError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistError(f"LOCAL_RANK={local_rank} but this node sees only {count} CUDA device(s) "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): start at most "
                            f"{count} processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_available():
        raise DistError("this PyTorch build has no torch.distributed support")
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s), **kwargs)
        except TypeError:  # older PyTorch without device_id
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    return _INFO


def cleanup() -> None:
    """Leave the process group (safe to call when none was started)."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to release
            pass
    _INFO = DistInfo()


def current() -> DistInfo:
    return _INFO


def is_distributed() -> bool:
    return _INFO.enabled and dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return _INFO.rank == 0


def get_rank() -> int:
    return _INFO.rank


def get_world_size() -> int:
    return _INFO.world_size


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (returned for chaining); identity in a single process. The tensor must be on
    the process's device (CUDA for NCCL)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors arrive on the CPU); identity in a single process."""
    if not is_distributed():
        return obj
    box = [obj if _INFO.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Synchronised BatchNorm
# ---------------------------------------------------------------------------------------------------------------------

def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the global batch, with the fused backward of ``nn.SyncBatchNorm``.

    Forward: per-channel sum and count, then the sum of squared deviations, each summed over ranks (two passes: as
    accurate as one process). Backward: ``dx = w / sigma * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)`` with the
    two sums taken over all ranks, so every rank's input receives the gradient of every rank's loss; ``dw``/``db``
    are this rank's sums (DDP averages them with the other parameters' gradients).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x.dtype, device=x.device)
        total = _all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _all_reduce(centred.pow(2).sum(dims)) / n
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(shape)
        out = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        ctx.dims, ctx.shape = dims, shape
        return out, mean, var, n

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gn):
        xhat, invstd, weight, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        sum_dy = grad_out.sum(dims)
        sum_dy_xhat = (grad_out * xhat).sum(dims)
        g = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]))
        c = sum_dy.numel()
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_out - (g[:c] / n).view(shape) - xhat * (g[c:] / n).view(shape)) * scale.view(shape)
        if weight is None:
            return grad_x, None, None, None
        return grad_x, sum_dy_xhat, sum_dy, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are over the global batch (all ranks), for CPU/gloo runs.

    ``nn.SyncBatchNorm`` refuses CPU tensors; this computes the same thing (:class:`_SyncBatchNormFunction`: two
    all-reduces forward, one backward). Running statistics use the unbiased global variance. Eval mode (and a single
    process) is plain BatchNorm. Same parameters, buffers and state_dict keys as ``BatchNorm2d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        out, mean, var, n = _SyncBatchNormFunction.apply(x, weight, bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm of ``model`` (in place, same parameter tensors and buffers) by a synchronised one:
    ``nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on CPU. A BatchNorm reached under several names stays one
    module (unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would copy it once per name)."""
    cls = nn.SyncBatchNorm if device_type == "cuda" else CpuSyncBatchNorm
    done: dict[int, nn.Module] = {}

    def convert(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (nn.SyncBatchNorm,
                                                                                          CpuSyncBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        done[id(module)] = out
        for name, child in list(module._modules.items()):
            if child is not None:
                new = convert(child)
                if new is not child:
                    module._modules[name] = new
        return out

    return convert(model)
