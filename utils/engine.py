"""Training and evaluation passes and how the model is run; counters stay on the device, read every check_every."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.pretrained import error_line
from utils import distributed


class RunError(RuntimeError):
    """A run that cannot go on for a reason the user can fix; the message is one line."""


class NonFiniteLoss(RunError):
    def __init__(self, step: int, value: float, steps: int):
        super().__init__(f"the loss became {value} at step {step} of {steps}")
        self.step, self.value, self.steps = step, value, steps


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM/SIGHUP; ``exit_code`` is the shell's ``128 + signal``, ``message`` says what is on disk."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message, self.exit_code = int(signum), message, 128 + int(signum)


class StopSignals:
    """First SIGINT/SIGTERM/SIGHUP sets :attr:`signum` (stop at the next step); a second raises :class:`Interrupted`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.ending = False  # set while the run winds down: a further signal is the same stop, not a traceback

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and not self.ending:
            raise Interrupted(signum)
        self.signum = self.signum or signum

    def __call__(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        # SIGHUP: a dropped ssh session or closed terminal, a stop like any other
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Schedule:
    """Step LR: epoch ``e`` runs at ``lr`` times the factors of the milestones before it; ``restart`` begins a stage
    from the best weights afresh. ``dropped``: the recipe's last stages that a short run leaves no epoch."""

    lr: float
    milestones: tuple
    gammas: tuple  # one factor per milestone
    epochs: int
    restart: bool = False
    dropped: int = 0

    @classmethod
    def from_recipe(cls, lr: float, recipe: dict, epochs: int | None = None) -> Schedule:
        """The recipe's milestones scaled to ``epochs``; a stage that gets no epoch is dropped, so stages follow one
        another in order and every milestone is strictly inside the run."""
        total = int(recipe["recipe_epochs"])
        epochs = total if epochs is None else int(epochs)
        gammas = recipe.get("gammas") or [0.1] * len(recipe["milestones"])
        kept = []
        for m in recipe["milestones"]:
            scaled = int(m) * epochs // total
            if not (kept[-1] if kept else 0) < scaled < epochs:
                break
            kept.append(scaled)
        return cls(
            float(lr),
            tuple(kept),
            tuple(float(g) for g in gammas[: len(kept)]),
            epochs,
            bool(recipe.get("restart", False)),
            len(recipe["milestones"]) - len(kept),
        )

    def stage(self, epoch: int) -> int:
        return sum(epoch > m for m in self.milestones)

    def lr_at(self, epoch: int) -> float:
        return self.lr * math.prod(self.gammas[: self.stage(epoch)])

    def describe(self) -> str:
        """``300 epochs, lr 0.1 x0.1 after epochs [150, 225]`` for the header, and what a short run dropped."""
        text = f"{self.epochs} epochs, lr {self.lr}"
        if self.milestones:
            factors = self.gammas[0] if len(set(self.gammas)) == 1 else list(self.gammas)
            text += f" x{factors} after epochs {list(self.milestones)}"
        if self.restart and self.milestones:
            text += " (restart from best)"
        if self.dropped:
            text += (
                f" ({self.dropped} last stage{'s' if self.dropped > 1 else ''} of the recipe dropped: no epoch left)"
            )
        return text


def json_line(record: dict) -> str:
    """Strict JSON on one line: a non-finite number (a diverged run) becomes null."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else v

    return json.dumps(clean(record), allow_nan=False)


def warn(message: str) -> None:
    if distributed.is_main_process():
        sys.stderr.write(f"warning: {message}\n")  # one write, so that ranks' lines do not interleave
        sys.stderr.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RunError(
            f"--device={name}, but {torch.cuda.device_count()} CUDA device(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); use --device=cpu"
        )
    return device


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and distributed.is_main_process()


@dataclass
class Precision:
    """Autocast dtype (None = the model's own dtype) and the GradScaler fp16 needs."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def make(cls, amp: bool, device: torch.device) -> Precision:
        if not amp:
            return cls()
        if device.type == "cuda":
            with torch.cuda.device(device):  # the run's GPU, not whichever is current; emulated bf16 is slow
                if not torch.cuda.is_bf16_supported(including_emulation=False):
                    return cls(torch.float16, torch.amp.GradScaler("cuda"))
        return cls(torch.bfloat16)

    @property
    def label(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[self.dtype]


class Autocast(nn.Module):
    """Autocast inside forward, so DataParallel's replica threads (which do not inherit it) use the run's dtype."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(x)


def wrap_model(
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    *,
    compile: bool = False,
    ddp: bool = False,
    data_parallel: bool = True,
) -> Callable:
    """Autocast, then DDP (torchrun) or DataParallel (several GPUs), then compile; checkpoints store ``model``."""
    net = Autocast(model, device.type, precision.dtype) if precision.dtype is not None else model
    if ddp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    elif data_parallel and device.type == "cuda" and torch.cuda.device_count() > 1:
        print(f"Let's use {torch.cuda.device_count()} GPUs!")
        net = nn.DataParallel(net, device_ids=list(range(torch.cuda.device_count())), output_device=device)
    return CompiledOrEager(net) if compile else net


class CompiledOrEager:
    """``torch.compile`` with the batch dimension dynamic from the start (one graph per mode, not one more for the
    short last batch); a compile failure at any call, first or later, costs one warning line and runs eager."""

    def __init__(self, net: Callable):
        self.eager, self.compiled = net, torch.compile(net, dynamic=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except torch.OutOfMemoryError:  # the batch, not the compiler: eager would run out too
                raise
            except Exception as e:  # noqa: BLE001  (torch raises many types; eager then shows a real error again)
                self.compiled = None
                warn(f"torch.compile failed ({error_line(e)}); running eager from here")
        return self.eager(x)


def _count(
    counts: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    ce_sum: torch.Tensor,
    reg_sum: torch.Tensor | None = None,
) -> None:
    """Adds to ``[CE sum, R sum, top-1 hits, top-5 hits, images]`` on the device, so that no step waits for a sync."""
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y.unsqueeze(1))
    counts[0] += ce_sum
    if reg_sum is not None:
        counts[1] += reg_sum
    counts[2:4] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    counts[4] += y.shape[0]


_WORKERS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators of passes that may not have ended
_BARS: weakref.WeakSet = weakref.WeakSet()  # their progress bars


def end_passes() -> None:
    """Close the progress bars and shut down the DataLoader workers of passes still alive (an exception's traceback
    keeps an interrupted pass alive): now, so that the run's last line does not land on a bar and a late Ctrl-C does
    not land in torch's ``__del__`` (an ignored-exception traceback)."""
    for bar in list(_BARS):
        bar.close()
    for batches in list(_WORKERS):
        getattr(batches, "_shutdown_workers", lambda: None)()  # torch's own clean shutdown, as __del__ calls it


def progress_bar(loader, desc: str, progress: bool):
    """A tqdm bar on stderr for one pass over ``loader`` (None without ``progress``)."""
    if not progress:
        return None
    from tqdm import tqdm

    bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    _BARS.add(bar)
    return bar


def say(text: str) -> None:
    """Print a line on stdout above the open progress bars (tqdm redraws them below it)."""
    if len(_BARS):
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
    else:
        print(text)


def _batches(loader, device: torch.device, channels_last: bool, bar=None) -> Iterator:
    fmt = torch.channels_last if channels_last else torch.preserve_format
    batches = iter(loader)
    if getattr(loader, "num_workers", 0):
        _WORKERS.add(batches)
    for x, y in batches:
        yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
        _BARS.discard(bar)


def _stats(counts: torch.Tensor, seconds: float, has_reg: bool, what: str) -> dict:
    """:func:`pass_stats` of the counts summed over all ranks."""
    totals = distributed.all_reduce(counts).tolist()
    if totals[-1] == 0:
        raise RunError(f"the {what} set is empty")
    return pass_stats(totals, seconds, has_reg)


def _ce(logits: torch.Tensor, y: torch.Tensor, precision: Precision, **kw) -> torch.Tensor:
    """In the model's own dtype (float64 stays float64); from fp32 logits under autocast."""
    return F.cross_entropy(logits.float() if precision.dtype is not None else logits, y, **kw)


def train_one_epoch(
    net: Callable,
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    regularizer: Callable[[], torch.Tensor] | None = None,
    lambda_r: float = 0.0,
    precision: Precision | None = None,
    channels_last: bool = False,
    stop: Callable[[], bool] = lambda: False,
    print_first: bool = True,
    progress: bool = False,
    desc: str = "train",
    check_every: int = 50,
    on_check: Callable[[int, float, float | None], None] | None = None,
) -> dict:
    """One pass of CE + ``lambda_r`` * R (R identical on every rank, so DDP counts its gradient once) until ``stop()``.

    Every ``check_every`` steps (when the pass syncs anyway) ``on_check(step, loss, R)`` is called; the bar shows the
    loss every 10 steps. Returns :func:`pass_stats`, ``steps`` done in this call and whether it ``stopped`` early."""
    precision = precision or Precision()
    scaler = precision.scaler or torch.amp.GradScaler("cpu", enabled=False)  # disabled: plain backward and step
    model.train()
    counts = torch.zeros(5, dtype=torch.float64, device=device)  # see _count
    steps, checked, stopped, step, start = len(loader), 0, False, 0, time.perf_counter()
    losses = torch.zeros(max(steps, 1), dtype=torch.float32, device=device)  # step -> loss (no sync per step)
    bar = progress_bar(loader, desc, progress)
    for step, (x, y) in enumerate(_batches(loader, device, channels_last, bar), 1):
        logits = net(x)
        ce = _ce(logits, y, precision)
        reg = regularizer() if regularizer is not None else None  # fp32, outside autocast: see models.regularizer
        loss = ce if reg is None else ce + lambda_r * reg
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            batch = y.shape[0]
            _count(counts, logits.detach(), y, ce.detach() * batch, None if reg is None else reg.detach() * batch)
            losses[min(step, steps) - 1] = loss.detach()
        if step == 1 and print_first:
            say("accuracy_loss: %.6f" % ce.item())
            if reg is not None:
                say("similarity loss: %.6f" % reg.item())
        # single process: stop() after every step; under torchrun the ranks agree every check_every steps
        if step % check_every == 0 or step == steps or (not distributed.current().enabled and stop()):
            bad = ~torch.isfinite(losses[checked:step])  # the first non-finite loss since the last check, any rank
            first = torch.where(bad.any(), bad.to(torch.uint8).argmax() + checked, torch.tensor(steps, device=device))
            worst = int(distributed.all_reduce(first.reshape(1).to(torch.int64), "min").item())
            if worst < steps and worst < step:
                value = losses[worst].item() if not torch.isfinite(losses[worst]) else float("nan")  # another rank's
                raise NonFiniteLoss(worst + 1, value, steps)
            checked = step
            _show(bar, on_check, step, loss, reg)
            if step < steps and distributed.any_rank(stop(), device):
                stopped = True
                break
        elif bar is not None and step % 10 == 0:  # a terminal: a fresher loss on the bar, for one sync per 10 steps
            _show(bar, None, step, loss, reg)
    stats = _stats(counts, time.perf_counter() - start, regularizer is not None, "training")
    return dict(stats, steps=step, stopped=stopped)


def _show(bar, on_check: Callable | None, step: int, loss: torch.Tensor, reg: torch.Tensor | None) -> None:
    if bar is None and on_check is None:
        return
    values = (loss.item(), None if reg is None else reg.item())
    if bar is not None:
        bar.set_postfix_str(f"loss {values[0]:.4f}" + ("" if reg is None else f" R {values[1]:.5f}"), refresh=False)
    if on_check is not None:
        on_check(step, *values)


def pass_stats(totals: list, seconds: float, has_reg: bool) -> dict:
    """Means from ``[CE sum, R sum, top-1 hits, top-5 hits, images]`` (kept too, to merge parts of an epoch)."""
    loss_sum, reg_sum, c1, c5, n = totals
    return {
        "loss": loss_sum / n,
        "reg": reg_sum / n if has_reg else None,
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "images": int(n),
        "seconds": seconds,
        "img_per_s": n / max(seconds, 1e-9),
        "totals": list(totals),
    }


@torch.no_grad()
def evaluate(
    net: Callable,
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    precision: Precision | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "test",
) -> dict:
    """:func:`pass_stats` (``top1``, ``top5``, ``loss``, ``images``, ``seconds`` ...) over the loader; under DDP the
    shards' counts are summed."""
    precision = precision or Precision()
    model.eval()
    counts, start = torch.zeros(5, dtype=torch.float64, device=device), time.perf_counter()
    for x, y in _batches(loader, device, channels_last, progress_bar(loader, desc, progress)):
        logits = net(x)
        _count(counts, logits, y, _ce(logits, y, precision, reduction="sum"))
    return _stats(counts, time.perf_counter() - start, False, desc)


@contextlib.contextmanager
def run_context(device_flag: str, batch_size: int | None = None):
    """Device, torchrun process group (``cuda:LOCAL_RANK`` per process) and rank-0-only stdout."""
    device = resolve_device(device_flag)
    world = distributed.env_world_size()
    if world > 1 and device.type == "cuda" and device_flag not in ("auto", "cuda"):
        raise RunError(
            f"--device={device_flag} under torchrun: each process uses cuda:LOCAL_RANK; pass --device=cuda "
            f"and choose GPUs with CUDA_VISIBLE_DEVICES or --visible_device"
        )
    if batch_size is not None and batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise RunError(
            f"--batch_size={batch_size} is the global batch, split over {world} processes (WORLD_SIZE): "
            f"it must be divisible by {world}, e.g. --batch_size={upper}{f' or {lower}' if lower else ''}"
        )
    try:
        info = distributed.init_from_env(device.type)
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes
        with contextlib.ExitStack() as stack:
            if not distributed.is_main_process():  # other ranks' numbers are rank 0's after the all-reduces
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield device
    finally:
        distributed.cleanup()
