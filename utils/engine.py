"""Training and evaluation loops for the paper's recipes ("Learning Deeply Shared Filter Bases for Efficient
ConvNets", section 4; SPEC sections 5-7).

* :func:`train_one_epoch` / :func:`evaluate`: one pass each. Loss sums and top-1/top-5 counts stay on the device;
  the host reads them once per epoch (plus once on the first batch, for the authors' ``accuracy_loss:`` line, and
  every ``log_every`` steps when a progress bar is shown on a terminal).
* :class:`Schedule`: the learning-rate recipes as data (milestones, and whether a new stage restarts from the best
  checkpoint with a fresh optimizer, as the CIFAR-100 recipe does).
* :func:`fit`: the whole run for the training scripts: data, model, SGD, schedule, checkpoints (``best`` and
  ``last``, atomically written, resumable), TensorBoard, the authors' printed lines and a one-line summary per epoch.
* :func:`evaluate_checkpoint`: the evaluation scripts: rebuild the model from flags or from the checkpoint and score
  it on the test/val set.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import OrthogonalityRegularizer, get_model, model_rank_args
from models.registry import infer_ranks, rank_flags
from utils.checkpoint import (CheckpointError, atomic_write_bytes, capture_rng_state, check_identity, checkpoint_acc,
                              extract_state_dict, load_weights, make_checkpoint, read_checkpoint, restore_rng_state,
                              save_checkpoint, state_dict_mismatch)

FILE_PREFIX = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "ilsvrc": "ILSVRC"}


class RunError(RuntimeError):
    """A run that cannot go on for a reason the user can fix; the message is one line."""


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
    print(f"warning: {message}", file=sys.stderr, flush=True)


def wrap_model(model: nn.Module, device: torch.device, compile: bool = False) -> Callable:
    """The callable the loops run: DataParallel over all visible GPUs (when there are several and ``device`` is the
    first), optionally compiled.

    Checkpoints always store ``model`` itself (unwrapped), so files do not depend on these wrappers.
    """
    net = model
    if device.type == "cuda" and device.index in (None, 0) and torch.cuda.device_count() > 1:
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
                    log_every: int = 25) -> dict:
    """One training pass: loss = CE + ``lambda_r`` * R.

    Args:
        net: what to call on a batch (``model`` or its DataParallel/compiled wrapper).
        model: the bare model (train mode is set on it).
        regularizer: built once for ``model``; None for models without shared bases.
        print_first: print the authors' ``accuracy_loss:`` / ``similarity loss:`` lines for the first batch.
        channels_last: convert inputs to NHWC (for a model converted with ``--channels_last``).

    Returns:
        ``{"loss", "reg", "top1", "top5", "images", "seconds", "img_per_s"}`` (loss/reg are batch-size weighted means
        of the CE term and of R; accuracies in percent, on augmented images in train mode, as the authors report).
    """
    precision = precision or Precision()
    model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE * batch, R * batch]
    correct = torch.zeros(2, dtype=torch.long, device=device)  # [top-1, top-5]
    images = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
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
        if step == 0 and print_first:  # the authors' first-batch lines (one host sync per epoch)
            print("accuracy_loss: %.6f" % ce.item())
            if reg is not None:
                print("similarity loss: %.6f" % reg.item())
        if bar is not None:
            bar.update(1)
            if step % log_every == 0 or step == len(loader) - 1:  # host sync only when someone is watching
                c = correct.tolist()
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / images:.4f}", acc=f"{100.0 * c[0] / images:.2f}",
                                img_s=f"{images / (time.perf_counter() - start):.0f}")
    if bar is not None:
        bar.close()
    if images == 0:
        raise RunError("the training set is empty")
    (loss_sum, reg_sum), (c1, c5) = sums.tolist(), correct.tolist()  # the epoch's one read of the device counters
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / images, "reg": reg_sum / images if regularizer is not None else None,
            "top1": 100.0 * c1 / images, "top5": 100.0 * c5 / images, "images": images, "seconds": seconds,
            "img_per_s": images / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(net: Callable, model: nn.Module, loader, *, device: torch.device, precision: Optional[Precision] = None,
             channels_last: bool = False, progress: bool = False, desc: str = "test") -> dict:
    """Top-1/top-5 accuracy (percent) and mean CE over the whole loader, in eval mode.

    Returns:
        ``{"top1", "top5", "loss", "images", "correct1", "correct5", "seconds"}``.
    """
    precision = precision or Precision()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
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
    if images == 0:
        raise RunError("the test set is empty")
    c1, c5 = correct.tolist()
    loss = loss_sum.item()
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


def build_model(name: str, dataset: str, ranks: dict) -> nn.Module:
    """``get_model`` with only the rank keywords ``name`` takes (the authors' scripts ignore the others)."""
    takes = model_rank_args(name, dataset)
    try:
        return get_model(name, dataset, **{k: v for k, v in ranks.items() if k in takes and v is not None})
    except ValueError as e:
        raise RunError(f"cannot build {name} for {dataset}: {e}") from None


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
    best_acc: float = 0.0
    best_acc5: float = 0.0
    best_epoch: Optional[int] = None  # epoch of the weights in the best file (None: no best file from this run)
    stage: int = 0  # schedule stage of the last completed epoch


def _load_start(args, best_path: str, last_path: str):
    """Read the checkpoint a run starts from (``--resume`` or ``--pretrained``) before anything is written."""
    if args.resume is not None:
        path = last_path if args.resume == "auto" else args.resume
        if not os.path.isfile(path):
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
    return ckpt, path


def fit(args) -> dict:
    """Train as one of the paper's recipes; see the training scripts and ``utils/cli.py`` for ``args``.

    Returns:
        ``{"best_acc", "best_acc5", "best_epoch", "epochs", "best_checkpoint", "last_checkpoint"}``.
    """
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    seed_everything(args.seed)
    stem = run_stem(args)
    out_dir = args.output_dir
    best_path = os.path.join(out_dir, stem + ".pth")
    last_path = os.path.join(out_dir, stem + "-last.pth")

    # Everything that can fail on user input (checkpoint, data, model) happens before the first file is written.
    start_ckpt, start_path = _load_start(args, best_path, last_path)
    from utils.data import build_loaders

    train_loader, test_loader, num_classes = build_loaders(
        args.dataset, args.dataset_path, args.batch_size, num_workers=args.num_workers, device=device,
        seed=args.seed, channels_last=args.channels_last, train=True)
    ranks = {k: getattr(args, k) for k in ("shared_rank", "unique_rank")}
    model = build_model(args.model, args.dataset, ranks)
    _check_classes(model, num_classes, args.dataset_path)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
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
            rng_state = start_ckpt.get("rng_state")
            print(f"Resuming from {start_path} (epoch {state.epoch}, stage {state.stage + 1}, "
                  f"best top-1 {state.best_acc:.3f})")
        else:  # --pretrained: the authors' semantics: weights, optimizer state, best accuracy; --starting_epoch
            _load_optimizer(optimizer, opt_state, start_path, required=False)
            acc = checkpoint_acc(start_ckpt)
            state = RunState(epoch=args.starting_epoch, best_acc=acc or 0.0,
                             best_acc5=float(start_ckpt.get("best_acc5", 0.0) or 0.0),
                             stage=schedule.stage(args.starting_epoch))
            print(f"Starting from {start_path} (top-1 {state.best_acc:.3f}) at epoch {args.starting_epoch + 1}")
    elif args.starting_epoch:
        state = RunState(epoch=args.starting_epoch, stage=schedule.stage(args.starting_epoch))

    net = wrap_model(model, device, args.compile)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.dataset} {_describe(model)} | {n_params:,} params | "
          f"{device} {precision.label} | {schedule.epochs} epochs, lr {schedule.lr} x{schedule.gamma} after epochs "
          f"{list(schedule.milestones)}{' (restart from best)' if schedule.restart else ''} | "
          f"{len(train_loader.dataset)} train / {len(test_loader.dataset)} test images")

    os.makedirs(out_dir, exist_ok=True)
    if args.resume is None and os.path.exists(last_path):
        _warn(f"{last_path} exists and will be overwritten by this new run (use --resume to continue it)")
    resolved = {k: v for k, v in vars(args).items()}
    resolved.update(device=str(device), milestones=list(schedule.milestones), params=n_params)
    atomic_write_bytes((json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n").encode(),
                       os.path.join(out_dir, stem + "-args.json"))
    writer = _open_writer(os.path.join(out_dir, "runs", stem))
    progress = progress_enabled()
    if rng_state is not None:  # last, so that building things above does not shift the random streams
        restore_rng_state(rng_state)

    if state.epoch >= schedule.epochs:
        print(f"Nothing to do: the run already completed epoch {state.epoch} of {schedule.epochs}")
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
            tr = train_one_epoch(net, model, train_loader, optimizer, device=device, regularizer=regularizer,
                                 lambda_r=args.lambdaR, precision=precision, channels_last=args.channels_last,
                                 progress=progress,
                                 desc=f"epoch {epoch}/{schedule.epochs}")
            if not math.isfinite(tr["loss"]) or (tr["reg"] is not None and not math.isfinite(tr["reg"])):
                raise RunError(f"the loss became {tr['loss']} at epoch {epoch} (lr {lr}); nothing was saved for this "
                               f"epoch: lower --lr, or --resume from the last checkpoint")
            print("Training_Acc_Top1 = %.3f" % tr["top1"])
            print("Training_Acc_Top5 = %.3f" % tr["top5"])
            te = evaluate(net, model, test_loader, device=device, precision=precision,
                          channels_last=args.channels_last, progress=progress)
            improved = te["top1"] > state.best_acc  # strictly greater, as the authors
            if improved:
                state.best_acc, state.best_acc5, state.best_epoch = te["top1"], te["top5"], epoch
            state.epoch = epoch
            ckpt = make_checkpoint(model, optimizer, epoch=epoch, acc=te["top1"], acc5=te["top5"],
                                   best_acc=state.best_acc, best_acc5=state.best_acc5, best_epoch=state.best_epoch,
                                   stage=state.stage, lr=lr,
                                   scaler_state_dict=precision.scaler.state_dict() if precision.scaler else None,
                                   rng_state=capture_rng_state(), args=vars(args))
            paths = ([best_path] if improved else []) + [last_path]
            periodic = args.dataset == "ilsvrc" and epoch % 5 == 0  # the authors' ILSVRC history files
            if periodic:
                paths.append(os.path.join(out_dir, f"{stem}epoch{epoch}.pth"))
            save_checkpoint(ckpt, paths)
            _print_test_lines(args.dataset, te, state, improved, periodic)
            seconds = time.perf_counter() - epoch_start
            print("Time:  %.3f" % seconds)
            reg_text = f" R {tr['reg']:.5f}" if tr["reg"] is not None else ""
            print(f"[epoch {epoch}/{schedule.epochs}] stage {stage + 1} lr {lr:.5g} | train loss {tr['loss']:.4f}"
                  f"{reg_text} top1 {tr['top1']:.2f} | test loss {te['loss']:.4f} top1 {te['top1']:.2f} top5 "
                  f"{te['top5']:.2f} | best {state.best_acc:.2f} (epoch {state.best_epoch}) | {seconds:.1f}s "
                  f"{tr['img_per_s']:.0f} img/s")
            if writer is not None:
                scalars = {"train/loss": tr["loss"], "train/top1": tr["top1"], "train/top5": tr["top5"],
                           "test/loss": te["loss"], "test/top1": te["top1"], "test/top5": te["top5"], "lr": lr,
                           "train/img_per_s": tr["img_per_s"]}
                if tr["reg"] is not None:
                    scalars["train/R"] = tr["reg"]
                for key, value in scalars.items():
                    writer.add_scalar(key, value, epoch)
                writer.flush()
    finally:
        if writer is not None:
            writer.close()

    print("Best_Acc_top1 = %.3f" % state.best_acc)
    print("Best_Acc_top5 = %.3f" % state.best_acc5)
    result = {"best_acc": state.best_acc, "best_acc5": state.best_acc5, "best_epoch": state.best_epoch,
              "epochs": schedule.epochs, "best_checkpoint": best_path if state.best_epoch is not None else None,
              "last_checkpoint": last_path}
    print(json.dumps(result))
    return result


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
    """CIFAR-100 recipe: a new stage starts from the best weights so far with a fresh SGD (no momentum)."""
    source = None
    if state.best_epoch is not None and os.path.isfile(best_path):
        source = best_path
    elif args.pretrained is not None and start_path is not None:
        source = start_path  # the pretrained weights are the best this run has seen
    if source is not None:
        load_weights(model, read_checkpoint(source))
        what = f"the best checkpoint ({source}, top-1 {state.best_acc:.3f})"
    else:
        what = "the current weights (no best checkpoint yet)"
    lr = schedule.lr_at(epoch)
    print(f"Stage {schedule.stage(epoch) + 1} from epoch {epoch}: restarting from {what} with a fresh SGD at lr {lr:g}")
    return _make_optimizer(model, args, lr)


def _print_test_lines(dataset: str, te: dict, state: RunState, improved: bool, periodic: bool) -> None:
    """The authors' test-phase lines (CIFAR: on improvement only; ILSVRC: every epoch)."""
    if dataset == "ilsvrc":
        print("Test_Acc_Top1/5 = %.3f\t%.3f" % (te["top1"], te["top5"]))
        if improved:
            print("Saving Best..")
            print("Best_Acc_top1/5 = %.3f\t%.3f" % (state.best_acc, state.best_acc5))
        if periodic:
            print("Saving..")
    elif improved:
        print("Best_Acc_top1 = %.3f" % state.best_acc)
        print("Best_Acc_top5 = %.3f" % state.best_acc5)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation run
# ---------------------------------------------------------------------------------------------------------------------

def _resolve_eval_model(args, ckpt: dict, state: dict) -> nn.Module:
    """Model for ``ckpt``: ``--model`` and rank flags when given, else what the checkpoint records, else the
    authors' defaults; for files that record nothing, ranks that were not given are read off the tensor shapes."""
    fallback = args.fallback
    name = args.model or ckpt.get("model") or fallback["model"]
    try:
        takes = model_rank_args(name, args.dataset)
    except ValueError as e:
        raise CheckpointError(f"checkpoint records model {name!r}, unknown for {args.dataset}: {e}") from None
    given = {k: getattr(args, k) for k in takes if getattr(args, k) is not None}
    recorded = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k in takes}
    ranks = {k: given.get(k, recorded.get(k, fallback.get(k))) for k in takes}
    model = build_model(name, args.dataset, ranks)
    if takes and len(given) < len(takes) and state_dict_mismatch(model, state):
        try:
            inferred = infer_ranks(name, args.dataset, state)
        except ValueError:
            inferred = None  # load_weights below explains the mismatch
        if inferred is not None and all(inferred.get(k) == v for k, v in given.items()):
            print(f"Ranks read from the checkpoint: {rank_flags(inferred)}")
            model = build_model(name, args.dataset, inferred)
    return model


def _guess_model(dataset: str, state: dict) -> Optional[str]:
    """The ``--model``/rank flags of the first registered model whose keys and shapes fit ``state`` (for error
    messages about files that record nothing)."""
    from models import list_models

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


def evaluate_checkpoint(args) -> dict:
    """The evaluation scripts: load ``--pretrained``, rebuild its model, print top-1/top-5 on the test/val set."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    ckpt = read_checkpoint(args.pretrained)
    check_identity(ckpt, args.pretrained, dataset=args.dataset, model=args.model)
    state = extract_state_dict(ckpt)
    model = _resolve_eval_model(args, ckpt, state)
    try:
        load_weights(model, ckpt)
    except CheckpointError as e:
        guess = None if args.model or ckpt.get("model") else _guess_model(args.dataset, state)
        if guess:  # an authors' file evaluated without --model: say which flags fit it
            raise CheckpointError(f"{e}; the checkpoint fits {guess}") from None
        raise
    from utils.data import build_loaders

    _, test_loader, num_classes = build_loaders(
        args.dataset, args.dataset_path, args.batch_size, num_workers=args.num_workers, device=device,
        seed=args.seed, channels_last=args.channels_last, train=False)
    _check_classes(model, num_classes, args.dataset_path)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    precision = Precision.make(args.amp, device)
    net = wrap_model(model, device, args.compile)
    n_params = sum(p.numel() for p in model.parameters())
    kwargs = model.cfg.build_kwargs()
    print(f"{args.dataset} {_describe(model)} | {n_params:,} params | {args.pretrained} | "
          f"{device} {precision.label}")
    te = evaluate(net, model, test_loader, device=device, precision=precision, channels_last=args.channels_last,
                  progress=progress_enabled())
    print("Eval_Acc_top1 = %.3f" % te["top1"])
    print("Eval_Acc_top5 = %.3f" % te["top5"])
    print("Eval_Err_top1 = %.3f" % (100.0 - te["top1"]))
    print("Eval_Err_top5 = %.3f" % (100.0 - te["top5"]))
    result = {"dataset": args.dataset, "model": model.cfg.name, "model_kwargs": kwargs, "params": n_params,
              "checkpoint": args.pretrained, "checkpoint_epoch": ckpt.get("epoch"), "images": te["images"],
              "top1": te["top1"], "top5": te["top5"], "top1_err": 100.0 - te["top1"], "top5_err": 100.0 - te["top5"],
              "loss": te["loss"], "seconds": round(te["seconds"], 3)}
    print(json.dumps(result))
    return result
