"""Training-step and evaluation throughput of a shared-basis model against its plain baseline and against the
straightforward implementation (the authors' form: two basis convs + cat, per-step Python regulariser loop, fp32,
eager, NCHW), with each optimisation switched off in turn. Configurations are timed in interleaved rounds (medians,
after warm-up) on a fixed random batch, so machine load drifts affect all alike and data loading is excluded.

    python -m utils.benchmark --dataset cifar10 --model ResNet56_DoubleShared --shared_rank 16 --unique_rank 1

``--data`` instead times whole CIFAR epochs (train + test pass) through ``utils.data`` and ``utils.engine`` on random
data in the official layout, straightforward path against fast path, and estimates the paper's 300-epoch run::

    python -m utils.benchmark --data --device cuda --batch_size 256 --amp --channels_last --compile
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import OrthogonalityRegularizer, fold, get_model, set_fused
from models.registry import NUM_CLASSES
from models.regularizer import orthogonality_penalty_reference
from utils.data import _CIFAR_LAYOUT, build_loaders
from utils.engine import Precision, evaluate, resolve_device, train_one_epoch, wrap_model

PAPER_EPOCHS, PAPER_TRAIN, PAPER_TEST = 300, 50000, 10000  # the paper's CIFAR run: 300 epochs over 50k/10k images
OPTS = ("amp", "channels_last", "compile")  # the opt-in switches of the fast path


@dataclass(frozen=True)
class Config:
    """One way of running the model (the optimisations are the switches)."""

    label: str
    plain: bool = False
    fused: bool = True
    batched_reg: bool = True
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    folded: bool = False
    gpu_pipeline: bool = True  # --data: the GPU-resident loader when on CUDA (else the DataLoader)


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device work it queues included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _model(name: str, cfg: Config, args, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(
        name, args.dataset, shared_rank=args.shared_rank, unique_rank=args.unique_rank, ignore_unused_ranks=True
    ).to(device)
    set_fused(model, cfg.fused)
    return model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def _training(model: nn.Module, cfg: Config) -> tuple:
    """``(regulariser or None, the scripts' SGD)``: the library's batched regulariser or the authors' per-step loop."""
    reg = OrthogonalityRegularizer(model)
    if reg and not cfg.batched_reg:
        reg = functools.partial(orthogonality_penalty_reference, model, reg.include_unique)
    return reg or None, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


class Runner:
    """One configuration on a fixed batch; ``step()`` is a training step or a forward pass."""

    def __init__(self, cfg: Config, args, device: torch.device, train: bool) -> None:
        model = _model(args.plain_model if cfg.plain else args.model, cfg, args, device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.images = bs = args.batch_size if train else args.eval_batch_size
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(bs, *model.cfg.input_size, generator=g).to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, model.cfg.num_classes, (bs,), generator=g).to(device)
        precision = Precision.make(cfg.amp, device)
        self.amp = torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None)
        if train:
            self.reg, self.opt = _training(model.train(), cfg)
            self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler is not None)
        else:
            model = fold(model.eval()) if cfg.folded else model.eval()
        forward = wrap_model(model, device, Precision(), compile=cfg.compile, data_parallel=False)
        self.step = (lambda: self._train_step(forward)) if train else (lambda: self._eval_step(forward))

    def _train_step(self, forward) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.amp:
            loss = F.cross_entropy(forward(self.x), self.y)
        if self.reg is not None:
            loss = loss + 10.0 * self.reg()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    @torch.no_grad()
    def _eval_step(self, forward) -> None:
        with self.amp:
            forward(self.x)


def _interleaved(calls: dict, warmup: int, reps: int) -> dict:
    """``{label: [call() per round]}`` after ``warmup`` calls of each; a round runs all, in the same machine state."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    rounds = [{label: call() for label, call in calls.items()} for _ in range(reps)]
    return {label: [r[label] for r in rounds] for label in calls}


def measure(title: str, configs: list[Config], args, device: torch.device, train: bool) -> None:
    """Prints the median step time of each configuration (relative to the first) and its peak device memory."""
    runners = {c.label: Runner(c, args, device, train) for c in configs}
    times = _interleaved(
        {k: functools.partial(_seconds, r.step, device) for k, r in runners.items()}, args.warmup, args.reps
    )
    base = statistics.median(times[configs[0].label])
    print(f"\n{title}")
    print(f"{'configuration':44} {'ms/step':>9} {'img/s':>9} {'vs straightforward':>19} {'peak MiB':>9}")
    for label, runner in runners.items():
        peak = f"{'-':>9}"
        if device.type == "cuda":  # one more step, after all are timed
            torch.cuda.reset_peak_memory_stats()
            _seconds(runner.step, device)
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:9.0f}"
        t = statistics.median(times[label])
        print(f"{label:44} {t * 1e3:9.1f} {runner.images / t:9.0f} {t / base:18.2f}x {peak}")


def write_random_cifar(root: str, dataset: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Random (timing-only) uint8 images and labels in the official pickle layout under ``root``; returns ``root``."""
    subdir, train_files, test_files, label_key = _CIFAR_LAYOUT[dataset]
    os.makedirs(os.path.join(root, subdir), exist_ok=True)
    rng = np.random.default_rng(seed)
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for name, idx in zip(files, np.array_split(np.arange(n), len(files))):
            with open(os.path.join(root, subdir, name), "wb") as f:
                pickle.dump(
                    {
                        "data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8),
                        label_key: rng.integers(0, NUM_CLASSES[dataset], len(idx)).tolist(),
                    },
                    f,
                    protocol=2,
                )
    return root


class EpochRunner:
    """One configuration as the training script runs it: model, loaders, optimizer, regulariser, precision."""

    def __init__(self, cfg: Config, args, device: torch.device, dataset_path: str) -> None:
        self.model, self.device, self.cfg = _model(args.model, cfg, args, device), device, cfg
        self.reg, self.opt = _training(self.model, cfg)
        self.precision = Precision.make(cfg.amp, device)
        self.net = wrap_model(self.model, device, self.precision, compile=cfg.compile, data_parallel=False)
        self.train_loader, _, self.test_loader, _ = build_loaders(
            args.dataset,
            dataset_path,
            args.batch_size,
            num_workers=args.num_workers,
            device=device,
            gpu_pipeline=None if cfg.gpu_pipeline else False,
            channels_last=cfg.channels_last,
            download=False,
        )
        self.pipeline = type(self.train_loader).__name__

    def epoch(self) -> tuple:
        """(train seconds, test seconds) of one epoch, device work included."""
        kw = dict(device=self.device, precision=self.precision, channels_last=self.cfg.channels_last)
        train = _seconds(
            lambda: train_one_epoch(
                self.net,
                self.model,
                self.train_loader,
                self.opt,
                lambda_r=10.0,
                regularizer=self.reg,
                print_first=False,
                **kw,
            ),
            self.device,
        )
        return train, _seconds(lambda: evaluate(self.net, self.model, self.test_loader, **kw), self.device)


def measure_epochs(args, device: torch.device, straight: Config, fast: Config) -> None:
    if args.dataset not in ("cifar10", "cifar100"):
        raise SystemExit("--data needs --dataset cifar10 or cifar100")
    n_train = args.data_images or (PAPER_TRAIN if device.type == "cuda" else 2048)
    n_test = args.data_test_images or max(1, round(n_train * PAPER_TEST / PAPER_TRAIN))
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        path = args.dataset_path or write_random_cifar(tmp, args.dataset, n_train, n_test)
        runners = {c.label: EpochRunner(c, args, device, path) for c in (straight, fast)}
        r0 = runners[straight.label]
        n_train, n_test = len(r0.train_loader.dataset), len(r0.test_loader.dataset)
        print(
            f"--data: {n_train} train / {n_test} test images{' from ' + path if args.dataset_path else ''}, "
            f"{args.data_warmup} warm-up + {args.data_epochs} timed epochs per configuration (interleaved), "
            f"{args.num_workers} DataLoader workers"
        )
        times = _interleaved({k: r.epoch for k, r in runners.items()}, args.data_warmup, args.data_epochs)
    print("\nWhole epochs (train + test pass)")
    print(
        f"{'configuration':34} {'pipeline':15} {'train s':>8} {'test s':>7} {'train img/s':>12} "
        f"{'epoch img/s':>12} {'300 epochs':>11}"
    )
    rates = {}
    for label, ts in times.items():
        tr, te = (statistics.median(t[part] for t in ts) for part in (0, 1))
        rates[label] = n_train / tr, n_train / (tr + te)
        est = PAPER_EPOCHS * (tr * PAPER_TRAIN / n_train + te * PAPER_TEST / n_test)
        print(
            f"{label:34} {runners[label].pipeline:15} {tr:8.2f} {te:7.2f} {rates[label][0]:12.0f} "
            f"{rates[label][1]:12.0f} {est / 60:9.1f} m"
        )
    print(
        f"fast / straightforward: {rates[fast.label][0] / rates[straight.label][0]:.2f}x training throughput, "
        f"{rates[fast.label][1] / rates[straight.label][1]:.2f}x per epoch (train + test)"
    )
    print(f"300 epochs = {PAPER_EPOCHS} x (train epoch x {PAPER_TRAIN}/{n_train} + test pass x {PAPER_TEST}/{n_test})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "ilsvrc"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = p.add_argument_group("--data: whole epochs through utils.data + utils.engine (train pass + test pass)")
    for g, name, kind, default, text in (
        (p, "model", str, "ResNet56_DoubleShared", None),
        (p, "plain_model", str, None, "baseline (default: the model name without its variant)"),
        (p, "shared_rank", int, 16, None),
        (p, "unique_rank", int, 1, None),
        (p, "batch_size", int, None, "training batch (default 64 on CPU, 256 on CUDA)"),
        (p, "eval_batch_size", int, 256, None),
        (p, "warmup", int, 3, None),
        (p, "reps", int, 15, None),
        (p, "threads", int, None, "torch CPU threads (default: torch's choice)"),
        (d, "dataset_path", str, None, "an existing CIFAR directory (default: write random data)"),
        (d, "data_images", int, None, "training images (default 50000 on CUDA, 2048 on CPU)"),
        (d, "data_test_images", int, None, "test images (default: train / 5)"),
        (d, "data_epochs", int, 2, "timed epochs per configuration"),
        (d, "data_warmup", int, 1, "untimed warm-up epochs (compilation, cuDNN)"),
        (d, "num_workers", int, min(8, os.cpu_count() or 1), "DataLoader workers (straightforward path; CPU)"),
    ):
        g.add_argument(f"--{name}", type=kind, default=default, help=text)
    for g, name, text in (
        (p, "amp", "autocast (bf16, or fp16 + GradScaler where bf16 is missing)"),
        (p, "channels_last", None),
        (p, "compile", "torch.compile the fast path"),
        (p, "skip_train", None),
        (p, "skip_eval", None),
        (d, "data", "time whole epochs instead of fixed-batch steps"),
    ):
        g.add_argument(f"--{name}", action="store_true", help=text)
    return p


def main(argv=None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    args.plain_model = args.plain_model or args.model.split("_")[0]
    torch.backends.cudnn.benchmark = device.type == "cuda"
    chosen = [k for k in OPTS if getattr(args, k)]
    fast = Config("fast path", **{k: k in chosen for k in OPTS})
    straight = Config("straightforward (authors' form)", fused=False, batched_reg=False, gpu_pipeline=False)
    model = f"{args.dataset} {args.model} (s={args.shared_rank}, u={args.unique_rank})"
    where = (
        f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    if args.data:
        print(
            f"{model}; {where}, batch {args.batch_size}; fast path: fused, batched regulariser"
            f"{''.join(' + ' + k for k in chosen)}"
        )
        return measure_epochs(args, device, straight, fast)
    print(
        f"{model} vs {args.plain_model}; {where}, train batch {args.batch_size}, eval batch {args.eval_batch_size}, "
        f"{args.reps} interleaved rounds after {args.warmup} warm-up"
    )
    fast = replace(fast, label="fast path (all on)")
    switches = [("fused", "one conv over [unique || shared]"), ("batched_reg", "batched regulariser")]
    switches += [(k, k) for k in chosen]
    if not args.skip_train:
        configs = [straight, Config(f"plain {args.plain_model}", plain=True), fast]
        configs += [replace(fast, label=f"  fast without {text}", **{k: False}) for k, text in switches]
        measure("Training step", configs, args, device, train=True)
    if not args.skip_eval:
        eval_fast = replace(fast, label="folded (models.fold)", folded=True)
        configs = [
            Config("unfolded, two convs + cat", fused=False),
            Config(f"plain {args.plain_model}", plain=True),
            replace(fast, label="unfolded, fused basis conv", compile=False),
            eval_fast,
        ]
        configs += [replace(eval_fast, label=f"  folded without {k}", **{k: False}) for k in chosen]
        measure("Evaluation (forward only)", configs, args, device, train=False)


if __name__ == "__main__":
    main()
