"""A CPU stand-in for ``nn.SyncBatchNorm`` (torch's runs on GPUs only), so that the DDP tests can check ``--sync_bn``
on gloo: batch statistics are summed over ranks with the autograd-aware ``torch.distributed.nn.all_reduce``, whose
backward sums the gradients of those sums over ranks, as torch's CUDA kernel does.

``install()`` patches ``nn.SyncBatchNorm.forward`` for CPU inputs, lifts DDP's GPU-only check and tells
``utils.distributed`` that CPU runs may use ``--sync_bn``; a process started through :data:`LAUNCHER` runs a script
with it installed.
"""

import torch
import torch.nn as nn

LAUNCHER = """\
import runpy, sys
sys.path.insert(0, {tests!r})
import cpu_sync_bn
cpu_sync_bn.install()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _cpu_forward(self: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.nn import all_reduce

    if not (self.training and dist.is_initialized()):  # torch's own forward: plain BatchNorm
        return _torch_forward(self, x)
    dims = [0] + list(range(2, x.dim()))
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x.dtype)
    stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = stats[c : 2 * c] / n - mean * mean
    with torch.no_grad():  # torch's update: biased variance normalises, unbiased one is tracked
        self.num_batches_tracked += 1
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
        self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


_torch_forward = nn.SyncBatchNorm.forward


def _forward(self, x):
    return _cpu_forward(self, x) if x.device.type == "cpu" else _torch_forward(self, x)


def install() -> None:
    from torch.nn.parallel import DistributedDataParallel

    from utils import distributed

    nn.SyncBatchNorm.forward = _forward
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None  # its "GPU only" check
    distributed.SYNC_BN_DEVICES = distributed.SYNC_BN_DEVICES + ("cpu",)
