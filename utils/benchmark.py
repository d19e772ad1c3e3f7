"""Training-step and evaluation throughput of a shared-basis model against its plain baseline and against the
straightforward implementation (the authors' form), with each optimisation switched off in turn.

    python -m utils.benchmark --dataset cifar10 --model ResNet56_DoubleShared --shared_rank 16 --unique_rank 1

Training step = zero_grad, forward, cross-entropy + lambdaR * R, backward, SGD step, on a fixed random batch (so
data loading is excluded). Every configuration is timed in interleaved rounds in one process (medians over rounds,
after warm-up; CUDA events on GPU) so that drifting machine load affects all of them alike. Ratios are against the
straightforward path: two basis convs + cat, the regulariser as the authors' per-step Python loop with masks, fp32,
eager, contiguous (NCHW) tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import OrthogonalityRegularizer, fold, get_model, model_rank_args, set_fused
from models.regularizer import orthogonality_penalty_reference


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


def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def cpu(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def cuda(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    return cuda if device.type == "cuda" else cpu


class Runner:
    """Builds one configuration and exposes ``step()`` (train) or ``step()`` (eval) closures."""

    def __init__(self, cfg: Config, args, device: torch.device, train: bool) -> None:
        torch.manual_seed(0)
        name = args.plain_model if cfg.plain else args.model
        ranks = {} if cfg.plain else {k: getattr(args, k) for k in model_rank_args(name, args.dataset)
                                      if getattr(args, k) is not None}
        model = get_model(name, args.dataset, **ranks).to(device)
        set_fused(model, cfg.fused)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        size = model.cfg.input_size
        bs = args.batch_size if train else args.eval_batch_size
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(bs, *size, generator=g).to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, model.cfg.num_classes, (bs,), generator=g).to(device)
        self.images = bs
        amp = torch.autocast(device.type, dtype=_amp_dtype(device)) if cfg.amp else contextlib.nullcontext()
        self.amp = amp
        if train:
            model.train()
            include_unique = args.dataset == "cifar10"
            if cfg.batched_reg:
                reg = OrthogonalityRegularizer(model, include_unique)
                self.reg = reg if reg else None
            else:
                probe = OrthogonalityRegularizer(model, include_unique)
                self.reg = (lambda: orthogonality_penalty_reference(model, include_unique)) if probe else None
            self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and _amp_dtype(device) == torch.float16)
            forward = _maybe_compile(model, cfg.compile)
            self.step = lambda: self._train_step(forward)
        else:
            model.eval()
            if cfg.folded:
                model = fold(model)
            forward = _maybe_compile(model, cfg.compile)
            self.step = lambda: self._eval_step(forward)
        self.model = model

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


def _maybe_compile(model: nn.Module, enabled: bool):
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # pragma: no cover - depends on the platform
        warnings.warn(f"torch.compile unavailable ({type(e).__name__}); running eager")
        return model


def measure(configs: list[Config], args, device: torch.device, train: bool) -> dict:
    timer = _timer(device)
    runners = {}
    for c in configs:
        r = Runner(c, args, device, train)
        for _ in range(args.warmup):
            r.step()
        runners[c.label] = r
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = {c.label: [] for c in configs}
    for _ in range(args.reps):
        for c in configs:  # interleaved: every configuration sees the same machine state
            times[c.label].append(timer(runners[c.label].step))
    peak = {}
    if device.type == "cuda":
        for c in configs:
            torch.cuda.reset_peak_memory_stats()
            runners[c.label].step()
            torch.cuda.synchronize()
            peak[c.label] = torch.cuda.max_memory_allocated() / 2 ** 20
    return {c.label: (statistics.median(times[c.label]), runners[c.label].images, peak.get(c.label)) for c in configs}


def _report(title: str, results: dict, baseline: str) -> None:
    base = results[baseline][0]
    print(f"\n{title}")
    print(f"{'configuration':44} {'ms/step':>9} {'img/s':>9} {'vs straightforward':>19} {'peak MiB':>9}")
    for label, (t, images, peak) in results.items():
        peak_s = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
        print(f"{label:44} {t * 1e3:9.1f} {images / t:9.0f} {t / base:18.2f}x {peak_s}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "ilsvrc"])
    p.add_argument("--model", default="ResNet56_DoubleShared")
    p.add_argument("--plain_model", default=None, help="baseline (default: the model name without its variant)")
    p.add_argument("--shared_rank", type=int, default=16)
    p.add_argument("--unique_rank", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="autocast (bf16, or fp16 + GradScaler where bf16 is missing)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_eval", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    if args.plain_model is None:
        args.plain_model = args.model.split("_")[0]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"{args.dataset} {args.model} (s={args.shared_rank}, u={args.unique_rank}) vs {args.plain_model}; "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, train batch {args.batch_size}, "
          f"eval batch {args.eval_batch_size}, {args.reps} interleaved rounds after {args.warmup} warm-up")

    fast = Config("fast path (all on)", amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    switches = [("fused", "one conv over [unique || shared]"), ("batched_reg", "batched regulariser")]
    switches += [(k, k) for k in ("amp", "channels_last", "compile") if getattr(args, k)]
    straight = Config("straightforward (authors' form)", fused=False, batched_reg=False)
    if not args.skip_train:
        configs = [straight, Config(f"plain {args.plain_model}", plain=True), fast]
        configs += [replace(fast, label=f"  fast without {text}", **{k: False}) for k, text in switches]
        _report("Training step", measure(configs, args, device, train=True), straight.label)
    if not args.skip_eval:
        eval_fast = replace(fast, label="folded (models.fold)", folded=True)
        configs = [Config("unfolded, two convs + cat", fused=False), Config(f"plain {args.plain_model}", plain=True),
                   Config("unfolded, fused basis conv", amp=args.amp, channels_last=args.channels_last), eval_fast]
        configs += [replace(eval_fast, label=f"  folded without {k}", **{k: False})
                    for k in ("amp", "channels_last", "compile") if getattr(args, k)]
        _report("Evaluation (forward only)", measure(configs, args, device, train=False), configs[0].label)


if __name__ == "__main__":
    main()
