"""Where a training run starts: its model, its file names and provenance, and how it begins (fresh, ``--pretrained`` or
``--resume``, with the position inside an epoch), checked before any write."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models import get_model, summary
from models.download import fetch
from models.pretrained import CheckpointError, check_identity, checkpoint_acc, read_checkpoint
from models.registry import rank_flags
from utils import distributed
from utils.checkpoint import run_files_busy
from utils.data import VAL_SPLIT_SEED
from utils.engine import RunError, Schedule, warn

FILE_PREFIX = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "ilsvrc": "ILSVRC"}
# Flags a resumed run may change (a warning names them); other ranks would make it another run (refused).
_CHANGEABLE = (
    "lr",
    "momentum",
    "weight_decay",
    "lambdaR",
    "batch_size",
    "epochs",
    "dataset_path",
    "seed",
    "amp",
    "channels_last",
    "compile",
    "num_workers",
    "save_every_minutes",
)


@dataclass
class RunState:
    """What continues from checkpoint to checkpoint besides weights and optimizer."""

    epoch: int = 0  # last completed epoch
    best_acc: float = 0.0  # selection top-1 of the best checkpoint (validation with --val_split, else test)
    best_acc5: float = 0.0
    best_epoch: int | None = None  # None: no best file from this run
    stage: int = 0
    seconds: float = 0.0  # training time so far (all segments of a resumed run)


@dataclass
class RunStart:
    """How this run begins: ``kind`` is ``fresh``, ``pretrained`` or ``resume``."""

    kind: str = "fresh"
    path: str | None = None
    ckpt: dict | None = None
    state: RunState = field(default_factory=RunState)
    split_seed: int = VAL_SPLIT_SEED
    rng_states: list | None = None  # per rank, for --resume
    samples: int = 0  # --resume of a mid-epoch save: samples (all ranks) of epoch state.epoch + 1 already done
    totals: list | None = None  # and their loss/accuracy sums
    best_file: str | None = None  # --resume: where the run's best checkpoint is (another folder for --resume=PATH)


def model_for_run(args, num_classes: int | None = None) -> nn.Module:
    try:
        return get_model(
            args.model,
            args.dataset,
            shared_rank=args.shared_rank,
            unique_rank=args.unique_rank,
            num_classes=num_classes,
            ignore_unused_ranks=True,
        )
    except ValueError as e:
        raise RunError(f"cannot build {args.model} for {args.dataset}: {e}") from None


def check_classes(loaders, outputs: int, dataset_path: str, checkpoint: str | None = None) -> None:
    """A head as wide as the data has classes, said before the first step (other labels would fail mid-pass or score
    against the wrong classes)."""
    if loaders.num_classes != outputs:
        whose = f"checkpoint {checkpoint!r} has" if checkpoint else "the model has"
        raise RunError(
            f"{whose} {outputs} outputs but the dataset under {dataset_path!r} has {loaders.num_classes} "
            f"classes: use data with the classes it was trained on"
        )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a hung one
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(args) -> dict:
    """What reproduces a run: its command line, absolute paths, versions, this code's commit, host and start time."""
    import torchvision

    commit = _git("rev-parse", "HEAD")
    paths = {
        k: os.path.abspath(v)
        for k in ("dataset_path", "output_dir", "pretrained", "resume")
        if isinstance(v := getattr(args, k, None), str) and v != "auto"
    }
    return {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "cwd": os.getcwd(),
        "paths": paths,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def describe(model: nn.Module) -> str:
    """``ResNet56_DoubleShared --shared_rank=16 --unique_rank=1`` (the name alone for models without ranks)."""
    return f"{model.cfg.name} {rank_flags(model.cfg.build_kwargs())}".strip()


def run_stem(args) -> str:
    """The authors' checkpoint name, e.g. ``CIFAR10-ResNet20-S16-U1-L10-0`` (``L10`` for both 10 and 10.0; other values
    as Python writes the float, every digit kept, so that two runs with different ``--lambdaR`` never share files)."""
    lambda_r = float(args.lambdaR)
    return (
        f"{FILE_PREFIX[args.dataset]}-{args.model}-S{args.shared_rank}-U{args.unique_rank}"
        f"-L{int(lambda_r) if lambda_r.is_integer() else lambda_r}-{args.visible_device}"
    )


def pretrained_path(args) -> str:
    """``--pretrained``'s file; for ``--pretrained=paper`` the published checkpoint, downloaded unless cached."""
    if getattr(args, "published", None) is None:
        return args.pretrained
    return fetch(next(r for r in summary.PAPER_ROWS if (r.dataset, r.row) == (args.dataset, args.published)))


def decide_start(args, last_path: str, schedule: Schedule) -> RunStart:
    """Read and check the checkpoint a run starts from, before anything is written."""
    if args.resume is None and args.pretrained is None:
        return RunStart(state=RunState(args.starting_epoch, stage=schedule.stage(args.starting_epoch)))
    path = pretrained_path(args) if args.resume is None else (last_path if args.resume == "auto" else args.resume)
    if args.resume is not None and not os.path.exists(path):
        raise RunError(
            f"nothing to resume: {path!r} does not exist (the same flags as the interrupted run are needed "
            f"to find it; or drop --resume to start a new run)"
        )
    ckpt = read_checkpoint(path)
    check_identity(ckpt, path, dataset=args.dataset, model=args.model)
    acc, acc5 = checkpoint_acc(ckpt) or 0.0, float(ckpt.get("best_acc5") or 0.0)
    if args.resume is None:  # --pretrained, as the authors; a test-set score is no bar for a run selecting on val
        keep = not args.val_split
        state = RunState(
            args.starting_epoch, acc if keep else 0.0, acc5 if keep else 0.0, stage=schedule.stage(args.starting_epoch)
        )
        return RunStart("pretrained", path, ckpt, state)
    if not isinstance(ckpt.get("epoch"), int):
        raise CheckpointError(f"checkpoint {path!r} records no epoch; start from it with --pretrained instead")
    split = ckpt.get("val_split") or {}
    if split.get("n", 0) != args.val_split:
        raise RunError(
            f"checkpoint {path!r} belongs to a run with --val_split={split.get('n', 0)}: resume it with the "
            f"same --val_split (the split decides which checkpoint is best)"
        )
    for flag, value in (ckpt.get("model_kwargs") or {}).items():
        if getattr(args, flag, value) != value:
            raise RunError(
                f"checkpoint {path!r} was trained with --{flag}={value}, not {getattr(args, flag)}: resume "
                f"with --{flag}={value} (other ranks are another model)"
            )
    before = ckpt.get("args") or {}
    changed = [
        f"--{k} {before[k]} -> {getattr(args, k)}"
        for k in _CHANGEABLE
        if k in before and str(before[k]) != str(getattr(args, k))
    ]
    if changed:
        warn(f"resuming with flags that differ from the interrupted run's: {', '.join(changed)}")
    samples = _epoch_position(ckpt, path, before, args.batch_size)
    state = RunState(
        ckpt["epoch"],
        float(ckpt.get("best_acc", acc)),
        acc5,
        ckpt.get("best_epoch"),
        int(ckpt.get("stage", schedule.stage(ckpt["epoch"]))),
        float(ckpt.get("train_seconds") or 0.0),
    )
    return RunStart(
        "resume",
        path,
        ckpt,
        state,
        int(split.get("seed", VAL_SPLIT_SEED)),
        ckpt.get("rng_states") or [ckpt.get("rng_state")],
        samples,
        ckpt.get("epoch_totals"),
        _best_file_of(path, state),
    )


def _epoch_position(ckpt: dict, path: str, before: dict, batch_size: int) -> int:
    """The position of a mid-epoch save: the position in samples over all ranks, so that a resume with
    another --batch_size continues at the same sample (older files store steps of their own batch size)."""
    world = int(ckpt.get("world_size") or 1)
    samples = ckpt.get("epoch_samples")
    if samples is None:
        samples = int(ckpt.get("epoch_step") or 0) * int(before.get("batch_size") or batch_size)
    if samples and world != distributed.current().world_size:
        raise RunError(
            f"checkpoint {path!r} was saved inside epoch {ckpt['epoch'] + 1} by {world} process(es), and an epoch's "
            f"data order depends on their number: resume it with {world} process(es)"
        )
    return int(samples)


def _best_file_of(path: str, state: RunState) -> str | None:
    """The best checkpoint of the run that ``path`` continues: the ``-last.pth`` file's sibling, or ``path`` itself
    when it is that best epoch (None: the run has no best file)."""
    if state.best_epoch is None:
        return None
    sibling = path[: -len("-last.pth")] + ".pth" if path.endswith("-last.pth") else None
    if sibling is not None and os.path.isfile(sibling):
        return sibling
    return path if state.best_epoch == state.epoch else None


def _same_file(a: str, b: str | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def check_earlier_files(args, start: RunStart, out_dir: str, stem: str) -> None:
    """A run never replaces a checkpoint it did not write itself: only ``--resume`` of this folder's run or
    ``--overwrite`` may; and fine-tuning never writes over its ``--pretrained`` source. Checked before any write."""
    if not os.path.isdir(out_dir):
        return
    periodic = re.compile(re.escape(stem) + r"epoch\d+\.pth")  # the ILSVRC history files
    names = [f"{stem}.pth", f"{stem}-last.pth", *sorted(n for n in os.listdir(out_dir) if periodic.fullmatch(n))]
    existing = [p for n in names if os.path.isfile(p := os.path.join(out_dir, n))]
    if start.kind == "pretrained":
        source = next((p for p in existing if _same_file(p, start.path)), None)
        if source is not None:
            raise RunError(
                f"--pretrained={start.path} is where this run writes {os.path.basename(source)}: fine-tuning never "
                f"writes over its source; pass another --output_dir"
            )
    own = start.kind == "resume" and any(_same_file(p, start.path) for p in existing)
    if own or not existing or args.overwrite or run_files_busy(out_dir, stem):  # busy: the lock's message says so
        return
    last = os.path.join(out_dir, f"{stem}-last.pth")
    ways = (
        "continue that run with --resume, or pass --overwrite to replace it"
        if last in existing and start.kind != "resume"
        else "pass another --output_dir to keep it, or --overwrite to replace it"
    )
    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    raise RunError(f"{existing[0]!r}{more} holds an earlier run's checkpoint, which this run would replace: {ways}")
