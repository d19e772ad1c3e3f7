"""The model a run trains, and how the run begins -- fresh, from ``--pretrained``, or continuing with ``--resume`` --
decided once, into a :class:`RunStart`, from checks made before anything is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from models import get_model
from models.pretrained import CheckpointError, check_identity, checkpoint_acc, read_checkpoint
from models.registry import rank_flags
from utils.data import VAL_SPLIT_SEED
from utils.engine import RunError, Schedule, warn

FILE_PREFIX = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "ilsvrc": "ILSVRC"}
# Flags a resumed run may change (a warning names them); other ranks would make it another run (refused).
_CHANGEABLE = ("lr", "momentum", "weight_decay", "lambdaR", "batch_size", "epochs", "dataset_path", "seed", "amp",
               "channels_last", "compile", "num_workers", "save_every_minutes")


@dataclass
class RunState:
    """What continues from checkpoint to checkpoint besides weights and optimizer."""

    epoch: int = 0  # last completed epoch; training continues at epoch + 1
    best_acc: float = 0.0  # selection top-1 of the best checkpoint (validation with --val_split, else test)
    best_acc5: float = 0.0
    best_epoch: Optional[int] = None  # epoch of the weights in the best file (None: no best file from this run)
    stage: int = 0


@dataclass
class RunStart:
    """How this run begins: ``kind`` is ``fresh``, ``pretrained`` or ``resume``."""

    kind: str = "fresh"
    path: Optional[str] = None
    ckpt: Optional[dict] = None
    state: RunState = field(default_factory=RunState)
    split_seed: int = VAL_SPLIT_SEED
    rng_states: Optional[list] = None  # per rank, for --resume
    step: int = 0  # --resume of a mid-epoch save: steps of epoch state.epoch + 1 already done
    totals: Optional[list] = None  # and their loss/accuracy sums


def build_model(args) -> nn.Module:
    try:
        return get_model(args.model, args.dataset, shared_rank=args.shared_rank, unique_rank=args.unique_rank,
                         ignore_unused_ranks=True)
    except ValueError as e:
        raise RunError(f"cannot build {args.model} for {args.dataset}: {e}") from None


def describe(model: nn.Module) -> str:
    """``ResNet56_DoubleShared --shared_rank=16 --unique_rank=1`` (the name alone for models without ranks)."""
    return f"{model.cfg.name} {rank_flags(model.cfg.build_kwargs())}".strip()


def run_stem(args) -> str:
    """The authors' checkpoint name: ``{CIFAR10|CIFAR100|ILSVRC}-{model}-S{s}-U{u}-L{lambdaR}-{devices}``;
    ``L10`` for both 10 and 10.0 (the authors' files say ``L10.0`` when the flag was typed)."""
    return (f"{FILE_PREFIX[args.dataset]}-{args.model}-S{args.shared_rank}-U{args.unique_rank}"
            f"-L{float(args.lambdaR):g}-{args.visible_device}")


def decide_start(args, last_path: str, schedule: Schedule) -> RunStart:
    """Read and check the checkpoint a run starts from (``--resume`` / ``--pretrained``), before anything is written."""
    if args.resume is None and args.pretrained is None:
        return RunStart(state=RunState(args.starting_epoch, stage=schedule.stage(args.starting_epoch)))
    path = args.pretrained if args.resume is None else (last_path if args.resume == "auto" else args.resume)
    if args.resume is not None and not os.path.exists(path):
        raise RunError(f"nothing to resume: {path!r} does not exist (the same flags as the interrupted run are needed "
                       f"to find it; or drop --resume to start a new run)")
    ckpt = read_checkpoint(path)
    check_identity(ckpt, path, dataset=args.dataset, model=args.model)
    acc = checkpoint_acc(ckpt) or 0.0
    if args.resume is None:  # --pretrained: the authors' semantics (weights, optimizer, best accuracy)
        keep = not args.val_split  # a test-set score is no bar for a run that selects on validation
        acc5 = float(ckpt.get("best_acc5") or 0.0)
        state = RunState(args.starting_epoch, acc if keep else 0.0, acc5 if keep else 0.0,
                         stage=schedule.stage(args.starting_epoch))
        return RunStart("pretrained", path, ckpt, state)
    if not isinstance(ckpt.get("epoch"), int):
        raise CheckpointError(f"checkpoint {path!r} records no epoch; start from it with --pretrained instead")
    split = ckpt.get("val_split") or {}
    if split.get("n", 0) != args.val_split:
        raise RunError(f"checkpoint {path!r} belongs to a run with --val_split={split.get('n', 0)}: resume it with the "
                       f"same --val_split (the split decides which checkpoint is best)")
    _compare_flags(ckpt, path, args)
    state = RunState(ckpt["epoch"], float(ckpt.get("best_acc", acc)), float(ckpt.get("best_acc5") or 0.0),
                     ckpt.get("best_epoch"), int(ckpt.get("stage", schedule.stage(ckpt["epoch"]))))
    states = ckpt.get("rng_states") or [ckpt.get("rng_state")]
    return RunStart("resume", path, ckpt, state, int(split.get("seed", VAL_SPLIT_SEED)), states,
                    int(ckpt.get("epoch_step") or 0), ckpt.get("epoch_totals"))


def _compare_flags(ckpt: dict, path: str, args) -> None:
    """Refuse other ranks (another model); say which training flags differ from the interrupted run's."""
    recorded = ckpt.get("model_kwargs") or {}
    for flag, value in recorded.items():
        if getattr(args, flag, value) != value:
            raise RunError(f"checkpoint {path!r} was trained with --{flag}={value}, not {getattr(args, flag)}: resume "
                           f"with --{flag}={value} (other ranks are another model)")
    before = ckpt.get("args") or {}
    changed = [f"--{k} {before[k]} -> {getattr(args, k)}" for k in _CHANGEABLE
               if k in before and str(before[k]) != str(getattr(args, k))]
    if changed:
        warn(f"resuming with flags that differ from the interrupted run's: {', '.join(changed)}")
