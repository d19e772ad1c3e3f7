"""Training and evaluation loops for the paper's recipes ("Learning Deeply Shared Filter Bases for Efficient
ConvNets", section 4; SPEC sections 5-7).

* :func:`train_one_epoch` / :func:`evaluate`: one pass each. Loss sums and top-1/top-5 counts stay on the device;
  the host reads them once per epoch (plus once on the first batch, for the authors' ``accuracy_loss:`` line, and
  every ``log_every`` steps when a progress bar is shown on a terminal).
* :class:`Schedule`: the learning-rate recipes as data (milestones, and whether a new stage restarts from the best
  checkpoint with a fresh optimizer, as the CIFAR-100 recipe does).
* :func:`fit`: the whole run for the training scripts: data, model, SGD, schedule, checkpoints (``best`` and
  ``last``, atomically written, resumable), TensorBoard, the authors' printed lines and a one-line summary per epoch.
* :func:`evaluate_checkpoint`: the evaluation scripts: rebuild the model from the checkpoint
  (:func:`utils.checkpoint.load_model`'s logic), fold it for inference (:func:`models.fold`, unless ``--no_fold``)
  and score it on the test/val set.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) both run one process per GPU (or CPU slot) with
DistributedDataParallel (``utils/distributed.py``): ``--batch_size`` stays the global batch, every rank trains on its
shard, evaluation is sharded without padding and its counts are summed over ranks, and only rank 0 prints, logs and
writes files. SIGINT/SIGTERM end a training run between two checkpoint writes (never inside one) with status 130/143;
a non-finite loss ends it before anything of that epoch is saved.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import OrthogonalityRegularizer, get_model, model_rank_args
from models.registry import rank_flags
from utils import distributed
from utils.checkpoint import (CheckpointError, atomic_write_bytes, capture_rng_state, check_identity, checkpoint_acc,
                              load_weights, make_checkpoint, read_checkpoint, resolve_model, restore_rng_state,
                              save_checkpoint)
from utils.distributed import DistError

FILE_PREFIX = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "ilsvrc": "ILSVRC"}


class RunError(RuntimeError):
    """A run that cannot go on for a reason the user can fix; the message is one line."""


class NonFiniteLoss(RunError):
    """The training loss became nan/inf at ``step`` (1-based, within the epoch) with value ``value``."""

    def __init__(self, step: int, value: float, steps: int):
        super().__init__(f"the loss became {value} at step {step} of {steps}")
        self.step, self.value, self.steps = step, value, steps


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM turned into an exception; ``exit_code`` is the shell's ``128 + signal``."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class SignalGuard:
    """While active (``with``), SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, except inside
    :meth:`critical` sections (checkpoint writes), where the signal is held until the section ends, so that the best
    and last files always describe the same, completed epoch. Previous handlers are restored on exit. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: Optional[int] = None
        self._depth = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self.pending = signum
            return
        raise Interrupted(signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Step learning-rate schedule over 1-based epochs.

    Stage ``k`` (0-based) runs at ``lr * gamma**k``; epoch ``e`` belongs to stage ``#{m in milestones : e > m}``, so a
    milestone is the last epoch of its stage (the CIFAR-10 recipe: ``(150, 225)`` = lr for 1-150, x0.1 for 151-225,
    x0.01 for 226-300). With ``restart`` (the CIFAR-100 recipe) the first epoch of every new stage starts from the
    best checkpoint's weights with a fresh optimizer (momentum buffers cleared).

    When a run is shorter (or longer) than the recipe, milestones scale with it: ``max(1, m * epochs //
    recipe_epochs)`` (integer arithmetic, so a full-length run keeps the recipe's milestones exactly, and epoch 1 is
    always at the base lr). E.g. CIFAR-10 with ``--epochs 30``: x0.1 from epoch 16, x0.01 from epoch 23; with
    ``--epochs 3``: one epoch per stage.
    """

    lr: float
    milestones: tuple
    epochs: int
    restart: bool = False
    gamma: float = 0.1

    @classmethod
    def from_recipe(cls, lr: float, recipe: dict, epochs: Optional[int] = None) -> "Schedule":
        """``recipe``: ``{"recipe_epochs", "milestones", "restart"?, "gamma"?}`` (see the training scripts)."""
        total = int(recipe["recipe_epochs"])
        epochs = total if epochs is None else int(epochs)
        milestones = tuple(max(1, int(m) * epochs // total) for m in recipe["milestones"])
        return cls(lr=float(lr), milestones=milestones, epochs=epochs, restart=bool(recipe.get("restart", False)),
                   gamma=float(recipe.get("gamma", 0.1)))

    def stage(self, epoch: int) -> int:
        """0-based stage of 1-based ``epoch`` (0 for epoch 0, i.e. before training)."""
        return sum(epoch > m for m in self.milestones) if epoch > 0 else 0

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.gamma ** self.stage(epoch)


# ---------------------------------------------------------------------------------------------------------------------
# Devices, precision, wrappers
# ---------------------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device={name}, but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); use --device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device={name}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and the GradScaler used with fp16."""

    dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def make(cls, amp: bool, device: torch.device) -> "Precision":
        if not amp:
            return cls()
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return cls(torch.float16, torch.amp.GradScaler("cuda"))
        return cls(torch.bfloat16)  # CPU and GPUs with bf16: no loss scaling needed

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def label(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[self.dtype]


class _CompiledOrEager:
    """Calls ``torch.compile(module)``; if compiling fails on the first call, warns once and stays eager."""

    def __init__(self, module: nn.Module, warn: Callable[[str], None]) -> None:
        self.eager = module
        self.compiled = torch.compile(module)
        self.state = None  # None: untried, True: compiled works, False: fell back
        self.warn = warn

    def __call__(self, x):
        if self.state is False:
            return self.eager(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # no C++ compiler, unsupported op, backend error ...
            if self.state:  # it worked before: a real error, not a compile failure
                raise
            self.state = False
            self.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      f"running eagerly")
            return self.eager(x)
        self.state = True
        return out


def _warn(message: str) -> None:
    if distributed.is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def wrap_model(model: nn.Module, device: torch.device, compile: bool = False, ddp: bool = False,
               data_parallel: bool = True) -> Callable:
    """The callable the loops run: DistributedDataParallel under torchrun (``ddp``), else DataParallel over all
    visible GPUs (when ``data_parallel``, there are several and ``device`` is the first); optionally compiled.

    Checkpoints always store ``model`` itself (unwrapped), so files do not depend on these wrappers.
    """
    net = model
    if ddp:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif data_parallel and device.type == "cuda" and device.index in (None, 0) and torch.cuda.device_count() > 1:
        print(f"Let's use {torch.cuda.device_count()} GPUs!")
        net = nn.DataParallel(model)
    if compile:
        if not hasattr(torch, "compile"):
            _warn("torch.compile is not available in this PyTorch; running eagerly")
        else:
            net = _CompiledOrEager(net, _warn)
    return net


def progress_enabled() -> bool:
    """Progress bars only for people watching a terminal (not in logs, not in CI)."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def _topk_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits]`` of a batch as a device tensor (top-k clipped to the class count)."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(target.unsqueeze(1))
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


# ---------------------------------------------------------------------------------------------------------------------
# One pass
# ---------------------------------------------------------------------------------------------------------------------

def train_one_epoch(net: Callable, model: nn.Module, loader, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, regularizer: Optional[OrthogonalityRegularizer] = None,
                    lambda_r: float = 0.0, precision: Optional[Precision] = None, print_first: bool = True,
                    channels_last: bool = False, progress: bool = False, desc: str = "train",
                    log_every: int = 25, check_every: int = 50) -> dict:
    """One training pass: loss = CE + ``lambda_r`` * R.

    Args:
        net: what to call on a batch (``model`` or its DataParallel/DDP/compiled wrapper).
        model: the bare model (train mode is set on it).
        regularizer: built once for ``model``; None for models without shared bases. Under DDP every rank computes
            the same R from its (identical) weights; DDP averages the summed gradient of CE_rank + lambda R over
            ranks, which is the mean CE gradient plus lambda times R's gradient once (no double counting).
        print_first: print the authors' ``accuracy_loss:`` / ``similarity loss:`` lines for the first batch.
        channels_last: convert inputs to NHWC (for a model converted with ``--channels_last``).
        check_every: every this many steps (and at the end) the host looks at a device-side record of non-finite
            losses (one sync) and raises :class:`NonFiniteLoss` naming the first bad step; all ranks check at the
            same steps and agree (a min over ranks), so they stop together.

    Returns:
        ``{"loss", "reg", "top1", "top5", "images", "seconds", "img_per_s"}`` (loss/reg are batch-size weighted means
        of the CE term and of R; accuracies in percent, on augmented images in train mode, as the authors report;
        summed over all ranks under DDP).
    """
    precision = precision or Precision()
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE * batch, R * batch]
    correct = torch.zeros(2, dtype=torch.long, device=device)  # [top-1, top-5]
    steps = len(loader)
    bad = torch.zeros(max(steps, 1), dtype=torch.bool, device=device)  # step -> loss not finite (no sync per step)
    values = torch.zeros(max(steps, 1), dtype=torch.float32, device=device)
    checked = 0
    images = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    fmt = torch.channels_last if channels_last else torch.preserve_format
    for step, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = net(x)
            ce = F.cross_entropy(logits.float(), y)
        loss = ce
        reg = None
        if regularizer is not None:
            # R is computed in fp32 outside autocast: a bf16 Gram matrix cannot resolve deviations from I below 1e-2.
            reg = regularizer()
            loss = ce + lambda_r * reg
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.shape[0]
        images += n
        with torch.no_grad():
            sums[0] += ce.detach() * n
            if reg is not None:
                sums[1] += reg.detach() * n
            correct += _topk_correct(logits.detach(), y)
            if step < bad.numel():
                values[step] = loss.detach()
                bad[step] = ~torch.isfinite(loss.detach())
        if step == 0 and print_first:  # the authors' first-batch lines (one host sync per epoch)
            print("accuracy_loss: %.6f" % ce.item())
            if reg is not None:
                print("similarity loss: %.6f" % reg.item())
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _check_finite(bad, values, checked, step + 1, steps)
            checked = step + 1
        if bar is not None:
            bar.update(1)
            if step % log_every == 0 or step == steps - 1:  # host sync only when someone is watching
                c = correct.tolist()
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / images:.4f}", acc=f"{100.0 * c[0] / images:.2f}",
                                img_s=f"{images / (time.perf_counter() - start):.0f}")
    if bar is not None:
        bar.close()
    # the epoch's one read of the device counters (summed over ranks under DDP)
    totals = distributed.all_reduce_sum(torch.cat([sums, correct.to(torch.float64),
                                                   torch.tensor([float(images)], dtype=torch.float64,
                                                                device=device)]))
    loss_sum, reg_sum, c1, c5, images = totals.tolist()
    if images == 0:
        raise RunError("the training set is empty")
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / images, "reg": reg_sum / images if regularizer is not None else None,
            "top1": 100.0 * c1 / images, "top5": 100.0 * c5 / images, "images": int(images), "seconds": seconds,
            "img_per_s": images / max(seconds, 1e-9)}


def _check_finite(bad: torch.Tensor, values: torch.Tensor, start: int, stop: int, steps: int) -> None:
    """Raise :class:`NonFiniteLoss` for the first non-finite loss among steps ``start..stop-1`` of any rank."""
    window = bad[start:stop]
    first = torch.where(window.any(), window.to(torch.uint8).argmax() + start, torch.tensor(steps, device=bad.device))
    first = distributed.all_reduce_min(first.reshape(1).to(torch.int64))
    step = int(first.item())
    if step < steps:
        value = values[step].item() if bool(bad[step]) else float("nan")  # another rank's: its value is not here
        raise NonFiniteLoss(step + 1, value, steps)


@torch.no_grad()
def evaluate(net: Callable, model: nn.Module, loader, *, device: torch.device, precision: Optional[Precision] = None,
             channels_last: bool = False, progress: bool = False, desc: str = "test") -> dict:
    """Top-1/top-5 accuracy (percent) and mean CE over the whole loader, in eval mode.

    Under DDP each rank scores its shard (unpadded: no image counted twice) and the counts are summed over ranks,
    so the result is exactly the single-process one over the whole set. ``net`` must then not be the DDP wrapper
    (ranks may run different numbers of batches).

    Returns:
        ``{"top1", "top5", "loss", "images", "correct1", "correct5", "seconds"}``.
    """
    precision = precision or Precision()
    model.eval()
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    images = 0
    start = time.perf_counter()
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    for x, y in it:
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += _topk_correct(logits, y)
        images += y.shape[0]
    totals = distributed.all_reduce_sum(torch.cat([loss_sum, correct.to(torch.float64),
                                                   torch.tensor([float(images)], dtype=torch.float64,
                                                                device=device)]))
    loss, c1, c5, images = totals.tolist()
    c1, c5, images = int(c1), int(c5), int(images)
    if images == 0:
        raise RunError(f"the {desc} set is empty")
    return {"top1": 100.0 * c1 / images, "top5": 100.0 * c5 / images, "loss": loss / images, "images": images,
            "correct1": c1, "correct5": c5, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------------
# Run set-up shared by training and evaluation
# ---------------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


def format_lambda(value: float) -> str:
    """``10`` and ``10.0`` both give ``"10"``; ``0.5`` -> ``"0.5"``, ``1e-05`` -> ``"1e-05"``."""
    return f"{float(value):g}"


def run_stem(args) -> str:
    """Checkpoint name stem, as the authors': ``{CIFAR10|CIFAR100|ILSVRC}-{model}-S{s}-U{u}-L{lambdaR}-{devices}``.

    One difference: ``lambdaR`` is always written with ``%g`` (``L10``), where the authors' files say ``L10`` for the
    default and ``L10.0`` when ``--lambdaR=10`` was typed (argparse types only given values).
    """
    return (f"{FILE_PREFIX[args.dataset]}-{args.model}-S{args.shared_rank}-U{args.unique_rank}"
            f"-L{format_lambda(args.lambdaR)}-{args.visible_device}")


# The ranks the paper trained models with when the scripts' defaults (16/1) cannot build them.
PAPER_RANKS = {"ResNext50_SingleShared": "--shared_rank=64 --unique_rank=4"}


def build_model(name: str, dataset: str, ranks: dict) -> nn.Module:
    """``get_model`` with only the rank keywords ``name`` takes (the authors' scripts ignore the others)."""
    takes = model_rank_args(name, dataset)
    try:
        return get_model(name, dataset, **{k: v for k, v in ranks.items() if k in takes and v is not None})
    except ValueError as e:
        hint = ""
        if name in PAPER_RANKS:
            hint = f" (the paper's {name} was trained with {PAPER_RANKS[name]})"
        raise RunError(f"cannot build {name} for {dataset}: {e}{hint}") from None


def _make_optimizer(model: nn.Module, args, lr: float) -> torch.optim.SGD:
    # All parameters in one group: weight decay also reaches BN and biases, as in the authors' recipe.
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_classes(model: nn.Module, num_classes: int, dataset_path: str) -> None:
    classes = model.cfg.num_classes
    if num_classes > classes:
        raise RunError(f"the dataset under {dataset_path!r} has {num_classes} classes, more than the model's "
                       f"{classes} outputs")


def _describe(model: nn.Module) -> str:
    """``ResNet56_DoubleShared --shared_rank=16 --unique_rank=1`` (the name alone for models without ranks)."""
    return f"{model.cfg.name} {rank_flags(model.cfg.build_kwargs())}".strip()


def _open_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard not installed
        _warn(f"TensorBoard logging disabled ({type(e).__name__}: {e})")
        return None
    return SummaryWriter(log_dir=log_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Training run
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a resumed run needs beyond weights and optimizer (stored in every checkpoint)."""

    epoch: int = 0  # last completed epoch (1-based); training continues at epoch + 1
    best_acc: float = 0.0  # selection top-1 of the best checkpoint (validation with --val_split, else test)
    best_acc5: float = 0.0
    best_epoch: Optional[int] = None  # epoch of the weights in the best file (None: no best file from this run)
    stage: int = 0  # schedule stage of the last completed epoch


_USER_ERRORS = (CheckpointError, RunError, DistError)


def _user_errors():
    from utils.data import DatasetError

    return _USER_ERRORS + (DatasetError,)


def _from_main(fn: Callable):
    """``fn()`` computed on rank 0 and broadcast to every rank (identity in a single process). A user error on rank 0
    is raised on every rank with the same message, so no rank waits for one that quit. Used to read checkpoints, so
    that they need to exist only where rank 0 runs."""
    if not distributed.is_distributed():
        return fn()
    out = None
    if distributed.is_main_process():
        try:
            out = ("ok", fn())
        except _user_errors() as e:
            out = ("error", type(e).__name__, str(e))
    out = distributed.broadcast_object(out)
    if out[0] == "error":
        classes = {cls.__name__: cls for cls in _user_errors()}
        raise classes.get(out[1], RunError)(out[2])
    return out[1]


@contextlib.contextmanager
def _main_only_output():
    """Ranks other than 0 print nothing on stdout (their numbers are rank 0's after the all-reduces)."""
    if distributed.is_main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _distributed_device(device: torch.device, args) -> torch.device:
    """Join torchrun's process group (no-op outside torchrun); on CUDA each process uses ``cuda:LOCAL_RANK``."""
    world = distributed.env_world_size()
    if world > 1 and device.type == "cuda" and device.index is not None and args.device != "auto":
        raise RunError(f"--device={args.device} under torchrun: each process uses cuda:LOCAL_RANK; pass --device=cuda "
                       f"(or leave it out) and choose GPUs with CUDA_VISIBLE_DEVICES or --visible_device")
    info = distributed.init_from_env(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return device


def _check_global_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise RunError(f"--batch_size={batch_size} is the global batch, split over {world} processes (WORLD_SIZE): "
                       f"it must be divisible by {world}, e.g. --batch_size={upper}{f' or {lower}' if lower else ''}")


def _load_start(args, best_path: str, last_path: str):
    """Read the checkpoint a run starts from (``--resume`` or ``--pretrained``) before anything is written."""
    if args.resume is not None:
        path = last_path if args.resume == "auto" else args.resume
        if not os.path.exists(path):
            raise RunError(f"nothing to resume: {path!r} does not exist (the same flags as the interrupted run are "
                           f"needed to find it; or drop --resume to start a new run)")
    elif args.pretrained is not None:
        path = args.pretrained
    else:
        return None, None
    ckpt = read_checkpoint(path)
    check_identity(ckpt, path, dataset=args.dataset, model=args.model)
    if args.resume is not None and not isinstance(ckpt.get("epoch"), int):
        raise CheckpointError(f"checkpoint {path!r} records no epoch; start from it with --pretrained instead")
    if args.resume is not None:
        recorded = (ckpt.get("val_split") or {}).get("n", 0)
        if recorded != (getattr(args, "val_split", 0) or 0):
            raise RunError(f"checkpoint {path!r} belongs to a run with --val_split={recorded}: resume it with the same "
                           f"--val_split (the split decides which checkpoint is best)")
    return ckpt, path


def fit(args) -> dict:
    """Train as one of the paper's recipes; see the training scripts and ``utils/cli.py`` for ``args``.

    Returns:
        ``{"best_acc", "best_acc5", "best_epoch", "epochs", "selection", "val_acc", "val_acc5", "test_acc",
        "test_acc5", "best_checkpoint", "last_checkpoint"}`` (``best_acc`` is on the selection set: validation with
        ``--val_split``, else test).
    """
    device = resolve_device(args.device)
    _check_global_batch(args.batch_size, distributed.env_world_size())  # before waiting for the other processes
    try:
        device = _distributed_device(device, args)
        with _main_only_output(), SignalGuard() as guard:
            return _fit(args, device, guard)
    finally:
        distributed.cleanup()


def _fit(args, device: torch.device, guard: SignalGuard) -> dict:
    from utils.data import VAL_SPLIT_SEED, build_run_loaders

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    info = distributed.current()
    world, rank, main = info.world_size, info.rank, info.is_main
    _check_global_batch(args.batch_size, world)
    batch_size = args.batch_size // world
    val_split = getattr(args, "val_split", 0) or 0
    seed_everything(args.seed)
    stem = run_stem(args)
    out_dir = args.output_dir
    best_path = os.path.join(out_dir, stem + ".pth")
    last_path = os.path.join(out_dir, stem + "-last.pth")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunError(f"--output_dir={out_dir!r} exists and is not a directory")

    # Everything that can fail on user input (model, checkpoint, data) happens before the first file is written; the
    # model first, so that ranks that cannot build fail before the data is read.
    ranks = {k: getattr(args, k) for k in ("shared_rank", "unique_rank")}
    model = build_model(args.model, args.dataset, ranks)
    start_ckpt, start_path = _from_main(lambda: _load_start(args, best_path, last_path))
    split_seed = VAL_SPLIT_SEED
    if args.resume is not None and start_ckpt.get("val_split"):
        split_seed = int(start_ckpt["val_split"].get("seed", VAL_SPLIT_SEED))  # the run's split, whatever the default
    loaders = build_run_loaders(args.dataset, args.dataset_path, batch_size, num_workers=args.num_workers,
                                device=device, seed=args.seed, channels_last=args.channels_last, train=True,
                                val_split=val_split, split_seed=split_seed, rank=rank, world_size=world)
    train_loader, test_loader = loaders.train, loaders.test
    select_loader = loaders.val if val_split else loaders.test
    select_name = "val" if val_split else "test"
    _check_classes(model, loaders.num_classes, args.dataset_path)
    if getattr(args, "sync_bn", False) and world > 1:
        model = distributed.convert_sync_batchnorm(model, device.type)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if rank:  # model built from the same seed everywhere; augmentation streams differ per rank
        seed_everything(args.seed + 1_000_003 * rank)
    schedule = Schedule.from_recipe(args.lr, args.schedule, args.epochs)
    optimizer = _make_optimizer(model, args, schedule.lr_at(1))
    precision = Precision.make(args.amp, device)
    regularizer = OrthogonalityRegularizer(model, include_unique=args.reg_include_unique)
    regularizer = regularizer if regularizer else None  # plain and NonShared models: CE only

    state = RunState()
    rng_state = None
    if start_ckpt is not None:
        load_weights(model, start_ckpt)
        opt_state = start_ckpt.get("optimizer_state_dict")
        if args.resume is not None:
            _load_optimizer(optimizer, opt_state, start_path, required=True)
            if precision.scaler is not None and start_ckpt.get("scaler_state_dict"):
                precision.scaler.load_state_dict(start_ckpt["scaler_state_dict"])
            acc = checkpoint_acc(start_ckpt)
            state = RunState(epoch=start_ckpt["epoch"], best_acc=float(start_ckpt.get("best_acc", acc or 0.0)),
                             best_acc5=float(start_ckpt.get("best_acc5", 0.0) or 0.0),
                             best_epoch=start_ckpt.get("best_epoch"),
                             stage=int(start_ckpt.get("stage", schedule.stage(start_ckpt["epoch"]))))
            states = start_ckpt.get("rng_states")
            if isinstance(states, list) and len(states) == world:
                rng_state = states[rank]
            elif rank == 0:
                rng_state = start_ckpt.get("rng_state")
            print(f"Resuming from {start_path} (epoch {state.epoch}, stage {state.stage + 1}, "
                  f"best {select_name} top-1 {state.best_acc:.3f})")
        else:  # --pretrained: the authors' semantics: weights, optimizer state, best accuracy; --starting_epoch
            _load_optimizer(optimizer, opt_state, start_path, required=False)
            acc = checkpoint_acc(start_ckpt)
            if val_split:  # the file's accuracy is not on this run's validation images: it does not compete
                acc = 0.0
            state = RunState(epoch=args.starting_epoch, best_acc=acc or 0.0,
                             best_acc5=float(start_ckpt.get("best_acc5", 0.0) or 0.0) if not val_split else 0.0,
                             stage=schedule.stage(args.starting_epoch))
            print(f"Starting from {start_path} (top-1 {state.best_acc:.3f}) at epoch {args.starting_epoch + 1}")
    elif args.starting_epoch:
        state = RunState(epoch=args.starting_epoch, stage=schedule.stage(args.starting_epoch))

    net = wrap_model(model, device, args.compile, ddp=world > 1)
    # Evaluation runs the bare model under DDP: ranks may score different numbers of batches, and DDP's forward
    # would synchronise buffers on every call.
    eval_net = wrap_model(model, device, args.compile, data_parallel=False) if world > 1 else net
    n_params = sum(p.numel() for p in model.parameters())
    sizes = (f"{train_loader.num_samples} train / {loaders.val.num_samples} val (held out, split seed {split_seed}) / "
             if val_split else f"{train_loader.num_samples} train / ") + f"{test_loader.num_samples} test images"
    ddp = (f" | DDP {world} processes x batch {batch_size}{' sync BN' if getattr(args, 'sync_bn', False) else ''}"
           if world > 1 else "")
    print(f"{args.dataset} {_describe(model)} | {n_params:,} params | "
          f"{device} {precision.label}{ddp} | {schedule.epochs} epochs, lr {schedule.lr} x{schedule.gamma} after "
          f"epochs {list(schedule.milestones)}{' (restart from best)' if schedule.restart else ''} | {sizes} | "
          f"best checkpoint chosen on {select_name}")

    writer = None
    if main:
        try:
            os.makedirs(out_dir, exist_ok=True)
            if args.resume is None and os.path.exists(last_path):
                _warn(f"{last_path} exists and will be overwritten by this new run (use --resume to continue it)")
            resolved = {k: v for k, v in vars(args).items()}
            resolved.update(device=str(device), milestones=list(schedule.milestones), params=n_params,
                            world_size=world, split_seed=split_seed if val_split else None)
            atomic_write_bytes((json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n").encode(),
                               os.path.join(out_dir, stem + "-args.json"))
        except OSError as e:
            raise RunError(f"cannot write to --output_dir={out_dir!r}: {e.strerror or e}") from None
        writer = _open_writer(os.path.join(out_dir, "runs", stem))
    progress = progress_enabled() and main
    if rng_state is not None:  # last, so that building things above does not shift the random streams
        restore_rng_state(rng_state)
    split_record = {"n": val_split, "seed": split_seed} if val_split else None

    saved = [state.epoch]  # the last epoch whose files are complete on disk (what an interrupt message reports)

    def save(obj: dict, paths: list, epoch: Optional[int] = None) -> None:
        if not main:
            saved[0] = epoch or saved[0]
            return
        try:
            with guard.critical():  # a signal now waits until every file of this epoch is written
                save_checkpoint(obj, paths)
                saved[0] = epoch or saved[0]
        except OSError as e:
            raise RunError(f"could not write checkpoint {paths[0]!r} ({e.strerror or e}); the files of the previous "
                           f"epoch are intact") from None

    if state.epoch >= schedule.epochs:
        print(f"Nothing to do: the run already completed epoch {state.epoch} of {schedule.epochs}")
    epoch = state.epoch + 1
    try:
        for epoch in range(state.epoch + 1, schedule.epochs + 1):
            stage = schedule.stage(epoch)
            if schedule.restart and stage > state.stage:
                optimizer = _restart_stage(model, args, schedule, epoch, state, best_path, start_path)
                if precision.scaler is not None:
                    precision.scaler = torch.amp.GradScaler("cuda")
            state.stage = stage
            lr = schedule.lr_at(epoch)
            _set_lr(optimizer, lr)
            epoch_start = time.perf_counter()
            print(f"\nCuda {args.visible_device} {'Basis ' if regularizer is not None else ''}Epoch: {epoch}")
            train_loader.set_epoch(epoch)
            try:
                tr = train_one_epoch(net, model, train_loader, optimizer, device=device, regularizer=regularizer,
                                     lambda_r=args.lambdaR, precision=precision, channels_last=args.channels_last,
                                     progress=progress, desc=f"epoch {epoch}/{schedule.epochs}")
            except NonFiniteLoss as e:
                kept = (f"the checkpoints of epoch {state.epoch} are intact ({last_path})" if state.epoch
                        else "no epoch completed, nothing was saved")
                raise RunError(f"the loss became {e.value} at epoch {epoch}, step {e.step} of {e.steps} (lr {lr:g}); "
                               f"stopped without saving this epoch: {kept}; lower --lr (or --lambdaR), or --resume "
                               f"from the last checkpoint") from None
            if not math.isfinite(tr["loss"]) or (tr["reg"] is not None and not math.isfinite(tr["reg"])):
                raise RunError(f"the loss became {tr['loss']} at epoch {epoch} (lr {lr}); nothing was saved for this "
                               f"epoch: lower --lr, or --resume from the last checkpoint")
            print("Training_Acc_Top1 = %.3f" % tr["top1"])
            print("Training_Acc_Top5 = %.3f" % tr["top5"])
            te = evaluate(eval_net, model, select_loader, device=device, precision=precision,
                          channels_last=args.channels_last, progress=progress, desc=select_name)
            improved = te["top1"] > state.best_acc  # strictly greater, as the authors
            if improved:
                state.best_acc, state.best_acc5, state.best_epoch = te["top1"], te["top5"], epoch
            state.epoch = epoch
            rng_states = distributed.all_gather_object(capture_rng_state())
            scores = ({"val_acc": te["top1"], "val_acc5": te["top5"]} if val_split
                      else {"test_acc": te["top1"], "test_acc5": te["top5"]})
            ckpt = make_checkpoint(model, optimizer, epoch=epoch, acc=te["top1"], acc5=te["top5"], **scores,
                                   selection=select_name, val_split=split_record,
                                   best_acc=state.best_acc, best_acc5=state.best_acc5, best_epoch=state.best_epoch,
                                   stage=state.stage, lr=lr,
                                   scaler_state_dict=precision.scaler.state_dict() if precision.scaler else None,
                                   rng_state=rng_states[0], rng_states=rng_states if world > 1 else None,
                                   world_size=world, args=vars(args))
            paths = ([best_path] if improved else []) + [last_path]
            periodic = args.dataset == "ilsvrc" and epoch % 5 == 0  # the authors' ILSVRC history files
            if periodic:
                paths.append(os.path.join(out_dir, f"{stem}epoch{epoch}.pth"))
            save(ckpt, paths, epoch)
            _print_test_lines(args.dataset, te, state, improved, periodic, label="Val" if val_split else "Test")
            seconds = time.perf_counter() - epoch_start
            print("Time:  %.3f" % seconds)
            reg_text = f" R {tr['reg']:.5f}" if tr["reg"] is not None else ""
            print(f"[epoch {epoch}/{schedule.epochs}] stage {stage + 1} lr {lr:.5g} | train loss {tr['loss']:.4f}"
                  f"{reg_text} top1 {tr['top1']:.2f} | {select_name} loss {te['loss']:.4f} top1 {te['top1']:.2f} "
                  f"top5 {te['top5']:.2f} | best {state.best_acc:.2f} (epoch {state.best_epoch}) | {seconds:.1f}s "
                  f"{tr['img_per_s']:.0f} img/s")
            if writer is not None:
                scalars = {"train/loss": tr["loss"], "train/top1": tr["top1"], "train/top5": tr["top5"],
                           f"{select_name}/loss": te["loss"], f"{select_name}/top1": te["top1"],
                           f"{select_name}/top5": te["top5"], "lr": lr, "train/img_per_s": tr["img_per_s"]}
                if tr["reg"] is not None:
                    scalars["train/R"] = tr["reg"]
                for key, value in scalars.items():
                    writer.add_scalar(key, value, epoch)
                writer.flush()

        final = None
        if val_split:
            final = _score_on_test(model, eval_net, test_loader, args, state, best_path, last_path, device, precision,
                                   save)
            if writer is not None:
                for key, value in (("final/val_top1", final["val_acc"]), ("final/test_top1", final["test_acc"]),
                                   ("final/test_top5", final["test_acc5"])):
                    writer.add_scalar(key, value, schedule.epochs)
                writer.flush()
    except Interrupted as e:
        raise _interrupted(e, epoch, saved[0], last_path) from None
    except KeyboardInterrupt:
        raise _interrupted(Interrupted(signal.SIGINT), epoch, saved[0], last_path) from None
    finally:
        if writer is not None:
            writer.close()

    if val_split:
        print("Best_Val_Acc_top1 = %.3f" % state.best_acc)
        print("Best_Val_Acc_top5 = %.3f" % state.best_acc5)
        print("Test_Acc_top1 = %.3f" % final["test_acc"])
        print("Test_Acc_top5 = %.3f" % final["test_acc5"])
        chosen = (f"the checkpoint chosen on {val_split} held-out training images" if state.best_epoch is not None
                  else "the last checkpoint (no epoch scored above 0% on the held-out images)")
        print(f"The test set was scored once, on {chosen} (epoch {final['epoch']})")
        scores = {"val_acc": state.best_acc, "val_acc5": state.best_acc5, "test_acc": final["test_acc"],
                  "test_acc5": final["test_acc5"]}
    else:
        print("Best_Acc_top1 = %.3f" % state.best_acc)
        print("Best_Acc_top5 = %.3f" % state.best_acc5)
        scores = {"val_acc": None, "val_acc5": None, "test_acc": state.best_acc, "test_acc5": state.best_acc5}
    result = {"best_acc": state.best_acc, "best_acc5": state.best_acc5, "best_epoch": state.best_epoch,
              "epochs": schedule.epochs, "selection": select_name, **scores,
              "best_checkpoint": best_path if state.best_epoch is not None else None, "last_checkpoint": last_path}
    print(json.dumps(result))
    return result


def _interrupted(e: Interrupted, epoch: int, saved: int, last_path: str) -> Interrupted:
    """The one-line message of an interrupted run: what is on disk and how to continue."""
    where = f"after epoch {saved}" if saved >= epoch else f"during epoch {epoch}"
    if saved:
        kept = f"epoch {saved} (the last completed) is in {last_path}; rerun the same command with --resume"
    else:
        kept = "no epoch had completed, so there is nothing to resume"
    return Interrupted(e.signum, f"interrupted by {e.signal_name} {where}: {kept}")


def _score_on_test(model: nn.Module, eval_net: Callable, test_loader, args, state: RunState, best_path: str,
                   last_path: str, device: torch.device, precision: Precision, save: Callable) -> dict:
    """``--val_split``: score the checkpoint chosen on validation once on the test set; store ``test_acc`` in it.

    A finished run that already has the test score in its best file (a ``--resume`` with nothing to do) prints it
    without recomputing or rewriting anything.
    """
    path = best_path if state.best_epoch is not None else last_path
    ckpt = _from_main(lambda: read_checkpoint(path))
    if ckpt.get("test_acc") is not None and ckpt.get("epoch") == (state.best_epoch or state.epoch):
        return {"test_acc": float(ckpt["test_acc"]), "test_acc5": float(ckpt.get("test_acc5") or 0.0),
                "val_acc": float(ckpt.get("val_acc") or 0.0), "epoch": ckpt["epoch"]}
    load_weights(model, ckpt)
    te = evaluate(eval_net, model, test_loader, device=device, precision=precision, channels_last=args.channels_last,
                  progress=progress_enabled() and distributed.is_main_process(), desc="test")
    ckpt.update(test_acc=te["top1"], test_acc5=te["top5"])
    save(ckpt, [path])
    return {"test_acc": te["top1"], "test_acc5": te["top5"], "val_acc": float(ckpt.get("val_acc") or 0.0),
            "epoch": ckpt["epoch"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, opt_state, path: str, *, required: bool) -> None:
    if not opt_state:
        if required:
            raise CheckpointError(f"checkpoint {path!r} has no optimizer state to resume from")
        _warn(f"{path} has no optimizer state; starting with fresh SGD momentum")
        return
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        if required:
            raise CheckpointError(f"checkpoint {path!r}: optimizer state does not fit this model ({e})") from None
        _warn(f"{path}: optimizer state does not fit ({e}); starting with fresh SGD momentum")


def _restart_stage(model: nn.Module, args, schedule: Schedule, epoch: int, state: RunState, best_path: str,
                   start_path: Optional[str]) -> torch.optim.SGD:
    """CIFAR-100 recipe: a new stage starts from the best weights so far (best on the selection set: validation
    with ``--val_split``, else test) with a fresh SGD (no momentum). Rank 0 reads the file, every rank loads it."""
    def pick() -> Optional[str]:
        if state.best_epoch is not None and os.path.isfile(best_path):
            return best_path
        if args.pretrained is not None and start_path is not None:
            return start_path  # the pretrained weights are the best this run has seen
        return None

    source = _from_main(pick)  # decided where the files are (rank 0), so that every rank does the same
    if source is not None:
        load_weights(model, _from_main(lambda: read_checkpoint(source)))
        what = f"the best checkpoint ({source}, top-1 {state.best_acc:.3f})"
    else:
        what = "the current weights (no best checkpoint yet)"
    lr = schedule.lr_at(epoch)
    print(f"Stage {schedule.stage(epoch) + 1} from epoch {epoch}: restarting from {what} with a fresh SGD at lr {lr:g}")
    return _make_optimizer(model, args, lr)


def _print_test_lines(dataset: str, te: dict, state: RunState, improved: bool, periodic: bool,
                      label: str = "Test") -> None:
    """The authors' test-phase lines (CIFAR: on improvement only; ILSVRC: every epoch). With ``--val_split`` the
    per-epoch numbers are validation accuracies and say so (``Val_Acc_Top1/5``, ``Best_Val_Acc_top1``)."""
    best = "Best_Acc" if label == "Test" else "Best_Val_Acc"
    if dataset == "ilsvrc":
        print("%s_Acc_Top1/5 = %.3f\t%.3f" % (label, te["top1"], te["top5"]))
        if improved:
            print("Saving Best..")
            print("%s_top1/5 = %.3f\t%.3f" % (best, state.best_acc, state.best_acc5))
        if periodic:
            print("Saving..")
    elif improved:
        print("%s_top1 = %.3f" % (best, state.best_acc))
        print("%s_top5 = %.3f" % (best, state.best_acc5))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation run
# ---------------------------------------------------------------------------------------------------------------------

def _fold(model: nn.Module) -> tuple:
    """``(models.fold(model), True)``, or ``(model, False)`` with a warning when folding fails."""
    from models import fold

    try:
        return fold(model.eval()), True
    except Exception as e:  # a family without folding support: evaluate as is
        _warn(f"inference folding failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"evaluating the unfolded model")
        return model, False


def evaluate_checkpoint(args) -> dict:
    """The evaluation scripts: load ``--pretrained``, rebuild its model, fold it (unless ``--no_fold``), print
    top-1/top-5 on the test/val set. Under torchrun the set is sharded over the processes and the counts summed."""
    device = resolve_device(args.device)
    try:
        device = _distributed_device(device, args)
        with _main_only_output():
            return _evaluate_checkpoint(args, device)
    finally:
        distributed.cleanup()


def _evaluate_checkpoint(args, device: torch.device) -> dict:
    from utils.data import build_run_loaders

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    ckpt = _from_main(lambda: read_checkpoint(args.pretrained))
    name = args.model or ckpt.get("model") or args.fallback["model"]
    model, inferred = resolve_model(ckpt, args.pretrained, model=name, dataset=args.dataset,
                                    shared_rank=args.shared_rank, unique_rank=args.unique_rank)
    if inferred:
        print(f"Ranks read from the checkpoint: {rank_flags(model.cfg.build_kwargs())}")
    load_weights(model, ckpt)
    info = distributed.current()
    loaders = build_run_loaders(args.dataset, args.dataset_path, args.batch_size, num_workers=args.num_workers,
                                device=device, seed=args.seed, channels_last=args.channels_last, train=False,
                                rank=info.rank, world_size=info.world_size)
    _check_classes(model, loaders.num_classes, args.dataset_path)
    n_params = sum(p.numel() for p in model.parameters())
    kwargs = model.cfg.build_kwargs()
    described = _describe(model)
    model.eval()
    folded = False
    if not getattr(args, "no_fold", False):
        model, folded = _fold(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    precision = Precision.make(args.amp, device)
    net = wrap_model(model, device, args.compile, data_parallel=not info.enabled)
    world = f" | {info.world_size} processes" if info.enabled else ""
    print(f"{args.dataset} {described} | {n_params:,} params | {args.pretrained} | "
          f"{device} {precision.label}{world} | {'folded for inference' if folded else 'unfolded'}")
    te = evaluate(net, model, loaders.test, device=device, precision=precision, channels_last=args.channels_last,
                  progress=progress_enabled() and info.is_main)
    print("Eval_Acc_top1 = %.3f" % te["top1"])
    print("Eval_Acc_top5 = %.3f" % te["top5"])
    print("Eval_Err_top1 = %.3f" % (100.0 - te["top1"]))
    print("Eval_Err_top5 = %.3f" % (100.0 - te["top5"]))
    result = {"dataset": args.dataset, "model": model.cfg.name, "model_kwargs": kwargs, "params": n_params,
              "checkpoint": args.pretrained, "checkpoint_epoch": ckpt.get("epoch"), "folded": folded,
              "images": te["images"], "top1": te["top1"], "top5": te["top5"], "top1_err": 100.0 - te["top1"],
              "top5_err": 100.0 - te["top5"], "loss": te["loss"], "seconds": round(te["seconds"], 3)}
    print(json.dumps(result))
    return result
