"""The command line shared by the six scripts (``train_*.py``, ``eval_*.py``).

Every flag of the authors' scripts is accepted with the same meaning and default (SPEC section 6); each script passes
its own defaults dict (dataset, flag defaults, training recipe). Added flags: ``--epochs --seed --num_workers
--output_dir --device --resume --amp --channels_last --compile`` (all scripts), ``--val_split --sync_bn`` (training),
``--no_fold`` (evaluation). Multi-GPU/multi-node runs need no flag: start the script with ``torchrun``.

Errors a user can fix (unknown model, bad numbers, missing dataset, unusable checkpoint) end the script with one line
``<script>: error: <what and how to fix it>`` on stderr and a non-zero status (2 for bad flags, 1 otherwise), never a
traceback. SIGINT/SIGTERM end a training run with one line and status 130/143 (see :func:`run`).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import sys
from typing import Callable, Optional, Sequence

RANK_FLAGS = ("shared_rank", "unique_rank")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block), so logs and tests see a single message."""

    def error(self, message: str):  # noqa: D401  (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)``, except for switches and flags whose default is "not given"."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text}")
    return value


# argparse prints the type's __name__ in "invalid <name> value" messages
_positive_int.__name__ = "positive int"
_nonneg_int.__name__ = "non-negative int"
_nonneg_float.__name__ = "non-negative float"


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


_device.__name__ = "device"


def _visible_device(text: str) -> str:
    # CUDA_VISIBLE_DEVICES: indices, GPU-/MIG- UUIDs; it is also part of checkpoint file names, so no path characters
    if not re.fullmatch(r"[A-Za-z0-9_:-]+(,[A-Za-z0-9_:-]+)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices such as 0,1,2,3, got {text!r}")
    return text


_visible_device.__name__ = "device list"


def _common_parser(defaults: dict) -> argparse.ArgumentParser:
    """Flags of both the training and the evaluation scripts."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data (the authors' flags)")
    from models import list_models

    g.add_argument("--model", type=str, help=f"model name, one of: {', '.join(list_models(defaults['dataset']))}")
    g.add_argument("--shared_rank", type=_positive_int, help="rank s of each shared filter basis (group 1)")
    g.add_argument("--unique_rank", type=_positive_int, help="rank u of each layer's own basis (group 1)")
    g.add_argument("--batch_size", type=_positive_int, default=256, help="batch size, train and test")
    g.add_argument("--visible_device", type=_visible_device, default=None,
                   help="CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (several GPUs -> DataParallel; default 0, or the "
                        "environment's CUDA_VISIBLE_DEVICES when set)")
    g.add_argument("--pretrained", type=str, default=None, help="checkpoint to start from / to evaluate")
    g.add_argument("--dataset_path", type=str, help="dataset root")
    g = p.add_argument_group("added")
    g.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--num_workers", type=_nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="data-loading worker processes (the authors fixed 8)")
    g.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, random and data order")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 autocast where supported (CPU, recent GPUs), else fp16 + GradScaler")
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    p.set_defaults(**defaults)
    return p


def _train_parser(prog: str, defaults: dict) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, parents=[_common_parser(defaults)], description=_script_doc(),
                formatter_class=_HelpFormatter)
    g = p.add_argument_group("optimisation (the authors' flags)")
    g.add_argument("--lr", type=_nonneg_float, help="initial learning rate")
    g.add_argument("--momentum", type=_nonneg_float, help="SGD momentum")
    g.add_argument("--weight_decay", type=_nonneg_float, help="weight decay (all parameters)")
    g.add_argument("--lambdaR", type=_nonneg_float, help="weight of the orthogonality regulariser")
    g.add_argument("--starting_epoch", type=_nonneg_int, default=0,
                   help="with --pretrained: the epoch the checkpoint ended at (training continues at the next)")
    g = p.add_argument_group("added")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help="total epochs (default: the recipe's); LR milestones scale proportionally")
    g.add_argument("--output_dir", type=str, default="./checkpoint",
                   help="where best/last checkpoints, args JSON and TensorBoard logs go")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue an interrupted run from its last checkpoint (or from PATH)")
    g.add_argument("--val_split", type=_nonneg_int, default=0, metavar="N",
                   help="hold out N training images (a fixed split, recorded in the checkpoints) to choose the best "
                        "checkpoint; the test set is then scored once, on that checkpoint, at the end. 0: choose on "
                        "the test set, as the paper")
    g.add_argument("--save_every_minutes", type=_nonneg_float, default=30.0, metavar="N",
                   help="also save a resumable mid-epoch checkpoint (-last.pth) every N minutes, so that a killed job "
                        "loses at most N minutes (0: only at epoch ends and on SIGINT/SIGTERM)")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
    return p


def _eval_parser(prog: str, defaults: dict) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, parents=[_common_parser(defaults)], description=_script_doc(),
                formatter_class=_HelpFormatter)
    # Model and ranks default to the checkpoint's record (then to the authors' defaults): None = not given.
    fallback = {k: defaults[k] for k in ("model", *RANK_FLAGS)}
    p.set_defaults(model=None, shared_rank=None, unique_rank=None, fallback=fallback)
    g = p.add_argument_group("added (evaluation)")
    g.add_argument("--no_fold", action="store_true",
                   help="evaluate the factorised model as trained instead of its inference-folded form (models.fold: "
                        "the same outputs up to float rounding, plain-convolution speed)")
    for action in p._actions:
        if action.dest in fallback:
            action.help = f"{action.help} (default: what the checkpoint records, else {fallback[action.dest]})"
    return p


def _script_doc() -> Optional[str]:
    """The running script's docstring (shown by ``--help``)."""
    main = sys.modules.get("__main__")
    return getattr(main, "__doc__", None)


def _check_model(parser: argparse.ArgumentParser, dataset: str, name: Optional[str]) -> None:
    from models import list_models

    valid = list_models(dataset)
    if name is not None and name not in valid:
        parser.error(f"unknown --model {name!r} for {dataset}; valid names: {', '.join(valid)}")


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _resolve_visible_device(args: argparse.Namespace) -> None:
    """Apply ``--visible_device`` before anything initialises CUDA. Without the flag the GPUs the environment chose
    (``CUDA_VISIBLE_DEVICES``) are kept and name the checkpoints; under torchrun every process keeps what it sees;
    otherwise GPU 0, the authors' default."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.visible_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.visible_device
    elif env:
        args.visible_device = env if re.fullmatch(r"[A-Za-z0-9_:-]+(,[A-Za-z0-9_:-]+)*", env) else "0"
    else:
        if not _under_torchrun():
            os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        args.visible_device = "0"


def _pick_recipe(recipes: dict, model: str) -> dict:
    for pattern, recipe in recipes.items():
        if fnmatch.fnmatch(model, pattern):
            return dict(recipe)
    raise KeyError(model)


def parse_train_args(defaults: dict, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None):
    """Parse and validate a training command line.

    Args:
        defaults: the script's dict: ``dataset``, flag defaults (``lr``, ``model``, ...), ``recipes`` (model-name glob
            -> ``{"epochs", "milestones", "restart"}``, first match wins).
    """
    prog = prog or os.path.basename(sys.argv[0])
    parser = _train_parser(prog, defaults)
    args = parser.parse_args(argv)
    _check_model(parser, args.dataset, args.model)
    if args.resume is not None and args.pretrained is not None:
        parser.error("--resume and --pretrained are exclusive (--resume continues this run; --pretrained starts "
                     "from another checkpoint)")
    try:
        recipe = _pick_recipe(args.recipes, args.model)
    except KeyError:
        parser.error(f"no training recipe for {args.model} on {args.dataset}")
    recipe["recipe_epochs"] = recipe.pop("epochs")
    args.schedule = recipe
    del args.recipes
    if args.epochs is None:
        args.epochs = recipe["recipe_epochs"]
    if args.starting_epoch >= args.epochs:
        parser.error(f"--starting_epoch={args.starting_epoch} leaves nothing to train (--epochs={args.epochs})")
    if args.lr == 0:
        print(f"{prog}: warning: --lr=0, the weights will not change", file=sys.stderr)
    _resolve_visible_device(args)
    return args


def parse_eval_args(defaults: dict, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None):
    """Parse and validate an evaluation command line (``--pretrained`` is required)."""
    prog = prog or os.path.basename(sys.argv[0])
    parser = _eval_parser(prog, defaults)
    args = parser.parse_args(argv)
    if not args.pretrained:
        parser.error("--pretrained=<checkpoint> is required (there is nothing to evaluate without weights)")
    _check_model(parser, args.dataset, args.model)
    _resolve_visible_device(args)
    return args


def run(main: Callable, args, prog: Optional[str] = None) -> int:
    """Call ``main(args)``; a user error becomes one stderr line and status 1, an interrupt one line and the
    shell's status (130, 143). Under torchrun, ranks other than 0 prefix their line with ``[rank N]``."""
    from models.pretrained import CheckpointError
    from utils.data import DatasetError
    from utils.distributed import DistError
    from utils.engine import Interrupted, RunError

    prog = prog or os.path.basename(sys.argv[0])
    rank = os.environ.get("RANK", "0") if _under_torchrun() else "0"
    tag = f"{prog}: " if rank == "0" else f"{prog} [rank {rank}]: "
    try:
        sys.stdout.reconfigure(line_buffering=True)  # logs piped through tee show up as they happen
    except (AttributeError, ValueError):
        pass
    try:
        main(args)
    except (CheckpointError, DatasetError, RunError, DistError) as e:
        sys.stdout.flush()
        print(f"{tag}error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        message = getattr(e, "message", "") or "interrupted (the last completed epoch, if any, is in the -last.pth " \
                                               "checkpoint; rerun with --resume)"
        print(f"{tag}{_one_line(message)}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    return 0


def _one_line(e) -> str:
    return " ".join(str(e).split("\n")).strip()


def train_main(defaults: dict, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the training scripts: parse, then :func:`utils.engine.fit`."""
    args = parse_train_args(defaults, argv)
    from utils.train import fit

    return run(fit, args)


def eval_main(defaults: dict, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the evaluation scripts: parse, then :func:`utils.engine.evaluate_checkpoint`."""
    args = parse_eval_args(defaults, argv)
    from utils.evaluate import evaluate_checkpoint

    return run(evaluate_checkpoint, args)
