"""The command line of the six scripts: the authors' flags with their meanings and defaults (SPEC section 6), plus
added ones. User errors end with one stderr line ``<script>: error: ...`` and status 2 (flags) or 1, never a traceback;
SIGINT/SIGTERM/SIGHUP end training with one line and status 130/143/129. Multi-GPU: start the script with ``torchrun``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import importlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence

RANK_FLAGS = ("shared_rank", "unique_rank")
PAPER = "paper"  # --pretrained=paper: the paper's published checkpoint (a file named paper: ./paper)
_FLAG_DEFAULTS = ("model", "lr", "momentum", "weight_decay", "lambdaR", "batch_size", "dataset_path")
_SCHEDULE = ("epochs", "milestones", "gammas", "restart")


def script_facts(kind: str, dataset: str, name: str) -> dict:
    """``RECIPE`` of ``train_<dataset>.py`` or ``DEFAULTS`` of ``eval_<dataset>.py``, for callers that pass none."""
    return getattr(importlib.import_module(f"{kind}_{dataset}"), name)


def recipe_for(recipe: dict, model: str) -> dict:
    """The schedule of ``model``: the recipe's, or that of the first ``per_model`` name or glob it matches."""
    own = next((r for glob, r in recipe["per_model"].items() if fnmatch.fnmatch(model, glob)), {})
    schedule = {k: own.get(k, recipe[k]) for k in _SCHEDULE}
    schedule["recipe_epochs"] = schedule.pop("epochs")
    schedule["include_unique"] = recipe["regularizer_includes_unique"]
    return schedule


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block), so logs and tests see a single message, and a word that
    names a flag without its ``--`` gets a did-you-mean hint."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{flag_hint(self, extras)}")
        return namespace


def flag_hint(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """`` (did you mean --lambdaR=10?)`` for the first unrecognized word that names a flag without its ``--`` (the
    authors' README writes ``visible_device=0,1,2,3``) or misspells one; '' when none does."""
    flags = [s for s in parser._option_string_actions if s.startswith("--")]
    for word in extras:
        name, eq, value = word.lstrip("-").partition("=")
        close = difflib.get_close_matches(f"--{name}", flags, n=1, cutoff=0.8)
        if close:
            return f" (did you mean {close[0]}{eq}{value}?)"
    return ""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)``, except for switches and flags whose default is "not given"."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _argtype(name: str, convert: Callable, ok: Callable, expected: str | None = None) -> Callable[[str], object]:
    """An argparse type: ``convert(text)`` where ``ok`` of it; argparse names ``name`` in "invalid <name> value"."""

    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got {text!r}" if expected else f"must be a {name}, got {text}"
            )
        return value

    parse.__name__ = name
    return parse


_positive_int = _argtype("positive integer", int, lambda v: v > 0)
# up to sys.maxsize: Python's slices and torch's int64 sizes take no more
_batch = _argtype("positive integer up to 2**63-1", int, lambda v: 0 < v < 2**63)
_seed = _argtype("integer from 0 to 2**32-1 (numpy's seed range)", int, lambda v: 0 <= v < 2**32)
_nonneg_int = _argtype("non-negative integer", int, lambda v: v >= 0)
# 4096 is above any group-1 basis that spans something here; a typo such as 100000 would fail allocating
_rank = _argtype("rank from 1 to 4096", int, lambda v: 0 < v <= 4096)
_nonneg_float = _argtype("finite non-negative number", float, lambda v: 0 <= v < float("inf"))  # nan fails too
_F32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: larger values overflow in the optimizer's step
_f32 = _argtype("non-negative number up to 3.4e38 (float32's range)", float, lambda v: 0 <= v <= _F32_MAX)
_device = _argtype("device", str, re.compile(r"auto|cpu|cuda(:\d+)?").fullmatch, "auto, cpu, cuda or cuda:N")
# GPU indices or GPU-/MIG- UUIDs; part of checkpoint file names, so no path characters
_VISIBLE = re.compile(r"[A-Za-z0-9_:-]+(,[A-Za-z0-9_:-]+)*")
_visible_device = _argtype("device list", str, _VISIBLE.fullmatch, "comma-separated GPU indices such as 0,1,2,3")


def _parser(prog: str, dataset: str) -> argparse.ArgumentParser:
    """Flags of both the training and the evaluation scripts; ``--help`` shows the running script's docstring."""
    from models import list_models

    p = _Parser(
        prog=prog, formatter_class=_HelpFormatter, description=getattr(sys.modules.get("__main__"), "__doc__", None)
    )
    g = p.add_argument_group("model and data (the authors' flags)")
    g.add_argument("--model", help=f"model name, one of: {', '.join(list_models(dataset))}")
    g.add_argument("--shared_rank", type=_rank, help="rank s of each shared filter basis (group 1)")
    g.add_argument("--unique_rank", type=_rank, help="rank u of each layer's own basis (group 1)")
    g.add_argument("--batch_size", type=_batch, help="batch size, train and test")
    g.add_argument(
        "--visible_device",
        type=_visible_device,
        help="CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (several: DataParallel; default: the environment's or 0)",
    )
    g.add_argument(
        "--pretrained",
        help=f"checkpoint to start from / to evaluate; '{PAPER}': the paper's published checkpoint of --model and "
        "the rank flags (downloaded once, checked; see models.download)",
    )
    g.add_argument("--dataset_path", help="dataset root")
    g = p.add_argument_group("added")
    g.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument(
        "--num_workers",
        type=_nonneg_int,
        default=min(8, os.cpu_count() or 1),
        help="data-loading worker processes (the authors fixed 8)",
    )
    g.add_argument("--seed", type=_seed, default=0, help="seed for torch, numpy, random and data order")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast where supported, else fp16")
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    p.set_defaults(dataset=dataset, published=None)  # published: the paper row of --pretrained=paper
    return p


def _train_parser(prog: str, dataset: str, recipe: dict) -> argparse.ArgumentParser:
    from models.registry import model_defaults

    p = _parser(prog, dataset)
    p.set_defaults(**{k: recipe[k] for k in _FLAG_DEFAULTS})
    paper = model_defaults(recipe["model"], dataset)
    for action in p._actions:
        if action.dest in RANK_FLAGS:
            example = f", e.g. {paper[action.dest]} for {recipe['model']}" if action.dest in paper else ""
            action.help += (
                f" (default: the model's paper row in models/registry.py{example}; models that take no such rank "
                f"name their files with {recipe[action.dest]})"
            )
    g = p.add_argument_group("optimisation (the authors' flags)")
    g.add_argument("--lr", type=_f32, help="initial learning rate")
    g.add_argument("--momentum", type=_f32, help="SGD momentum")
    g.add_argument("--weight_decay", type=_f32, help="weight decay (all parameters)")
    g.add_argument("--lambdaR", type=_f32, help="weight of the orthogonality regulariser")
    g.add_argument(
        "--starting_epoch", type=_nonneg_int, default=0, help="with --pretrained: the epoch the checkpoint ended at"
    )
    g = p.add_argument_group("added")
    g.add_argument(
        "--epochs", type=_positive_int, help="total epochs (default: the recipe's); LR milestones scale proportionally"
    )
    g.add_argument(
        "--output_dir", default="./checkpoint", help="where best/last checkpoints, args JSON and TensorBoard logs go"
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue an interrupted run from its last checkpoint (or from PATH)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="let this new run replace the checkpoints an earlier run of the same name left in --output_dir "
        "(without it such a run is refused; never the --pretrained source)",
    )
    g.add_argument(
        "--val_split",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="choose the best checkpoint on N "
        "held-out training images, test it once at the end (0: choose on the test set, as the paper)",
    )
    g.add_argument(
        "--save_every_minutes",
        type=_nonneg_float,
        default=30.0,
        metavar="N",
        help="also save a resumable mid-epoch -last.pth every N minutes (0: at epoch ends and on signals)",
    )
    g.add_argument(
        "--sync_bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)",
    )
    return p


def _eval_parser(prog: str, dataset: str, defaults: dict) -> argparse.ArgumentParser:
    p = _parser(prog, dataset)
    # --model: None = not given, then the checkpoint's record, then the script's default
    p.set_defaults(batch_size=defaults["batch_size"], dataset_path=defaults["dataset_path"])
    p.set_defaults(model=None, shared_rank=None, unique_rank=None, fallback={"model": defaults["model"]})
    g = p.add_argument_group("added (evaluation)")
    g.add_argument(
        "--no_fold",
        action="store_true",
        help="evaluate the factorised model as trained, not its folded form (models.fold: same outputs)",
    )
    for action in p._actions:
        if action.dest == "model":
            action.help += f" (default: what the checkpoint records, else {defaults['model']})"
        if action.dest in RANK_FLAGS:
            action.help += " (default: read off the checkpoint's tensor shapes; given, they are checked against them)"
    return p


def _default_ranks(args: argparse.Namespace, recipe: dict) -> None:
    """Rank flags not given: the model's paper row (models/registry.py) for the ranks it takes, else the recipe's
    value, which only names the files (``-S16-U1``). ``args.default_ranks``: those taken from the registry."""
    from models.registry import model_defaults

    paper = model_defaults(args.model, args.dataset)
    args.default_ranks = {k: paper[k] for k in RANK_FLAGS if getattr(args, k) is None and k in paper}
    for k in RANK_FLAGS:
        if getattr(args, k) is None:
            setattr(args, k, paper.get(k, recipe[k]))


def _check_model(parser: argparse.ArgumentParser, dataset: str, name: str | None) -> str | None:
    """The registered spelling of ``--model`` (the authors' README writes ``ResNet56-DoubleShared``), or exit."""
    from models import canonical_name, list_models, unknown_model

    if name is not None and canonical_name(name) not in list_models(dataset):
        parser.error(unknown_model(name, dataset).replace("unknown model", "unknown --model", 1))
    return canonical_name(name) if name is not None else None


def _pick_published(parser: argparse.ArgumentParser, args: argparse.Namespace, model: str, ranks: dict) -> None:
    """``--pretrained=paper``: the published row of ``model`` at ``ranks`` (status 2 naming the dataset's rows when
    there is none); ``--pretrained`` becomes its cache path, fetched by :func:`utils.run_start.pretrained_path`."""
    from models.download import cache_path
    from models.summary import published_row

    try:
        row = published_row(args.dataset, model, ranks)
    except ValueError as e:
        parser.error(f"--pretrained={PAPER}: {e}")
    args.pretrained, args.published, args.model = cache_path(row), row.row, row.model
    args.__dict__.update(dict(row.ranks))


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _resolve_visible_device(args: argparse.Namespace) -> None:
    """Apply ``--visible_device`` before CUDA starts; else keep the environment's, under torchrun too; else GPU 0."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.visible_device is None:
        args.visible_device = env if env and _VISIBLE.fullmatch(env) else "0"
        if env or _under_torchrun():
            return  # the environment's choice stands
    os.environ["CUDA_VISIBLE_DEVICES"] = args.visible_device


def parse_train_args(
    dataset: str, argv: Sequence[str] | None = None, prog: str | None = None, recipe: dict | None = None
):
    """Parse and validate a training command line for ``dataset`` (defaults and schedule from ``recipe``, by
    default ``train_<dataset>.RECIPE``)."""
    recipe = recipe or script_facts("train", dataset, "RECIPE")
    parser = _train_parser(prog or os.path.basename(sys.argv[0]), dataset, recipe)
    args = parser.parse_args(argv)
    args.model = _check_model(parser, args.dataset, args.model)
    _default_ranks(args, recipe)
    if args.resume is not None and args.pretrained is not None:
        parser.error(
            "--resume and --pretrained are exclusive (--resume continues this run; --pretrained starts "
            "from another checkpoint)"
        )
    if args.pretrained == PAPER:
        _pick_published(parser, args, args.model, {k: getattr(args, k) for k in RANK_FLAGS})
    args.schedule = recipe_for(recipe, args.model)
    args.epochs = args.epochs or args.schedule["recipe_epochs"]
    if args.starting_epoch >= args.epochs:
        parser.error(f"--starting_epoch={args.starting_epoch} leaves nothing to train (--epochs={args.epochs})")
    if args.starting_epoch and args.pretrained is None and args.resume is None:
        print(
            f"{parser.prog}: warning: --starting_epoch={args.starting_epoch} without --pretrained: random weights "
            f"start at epoch {args.starting_epoch + 1}'s learning rate (give the checkpoint that ended there)",
            file=sys.stderr,
        )
    if args.lr == 0:
        print(f"{parser.prog}: warning: --lr=0, the weights will not change", file=sys.stderr)
    _resolve_visible_device(args)
    return args


def parse_eval_args(
    dataset: str, argv: Sequence[str] | None = None, prog: str | None = None, defaults: dict | None = None
):
    """Parse and validate an evaluation command line (``--pretrained`` is required); ``defaults``: by default
    ``eval_<dataset>.DEFAULTS``."""
    defaults = defaults or script_facts("eval", dataset, "DEFAULTS")
    parser = _eval_parser(prog or os.path.basename(sys.argv[0]), dataset, defaults)
    args = parser.parse_args(argv)
    if not args.pretrained:
        parser.error("--pretrained=<checkpoint> is required (there is nothing to evaluate without weights)")
    args.model = _check_model(parser, args.dataset, args.model)
    if args.pretrained == PAPER:
        given = {k: getattr(args, k) for k in RANK_FLAGS if getattr(args, k) is not None}
        _pick_published(parser, args, args.model or args.fallback["model"], given)
    _resolve_visible_device(args)
    return args


_INTERRUPTED = {  # what an interrupt leaves, by what was interrupted (a training run says it more exactly itself)
    "train": "interrupted (the last completed epoch, if any, is in the -last.pth checkpoint; rerun with --resume)",
    "eval": "interrupted: evaluation writes nothing, rerun it to score the checkpoint",
}


class Outcome:
    """The exit status :func:`one_line_errors` decided (0 when the block ended normally)."""

    code = 0


@contextlib.contextmanager
def one_line_errors(prog: str | None = None, exiting: bool = False, what: str = "train"):
    """Around a script's work: a user error becomes one stderr line and status 1, an interrupt one line and
    130/143/129 (``exiting``: the process ends after, so later signals are ignored); ``what``: ``train`` or ``eval``.
    A context manager, not a wrapper call, so that it adds no frame between the script and the training step."""
    from models.pretrained import CheckpointError
    from models.registry import flag_wording
    from utils.data import DatasetError
    from utils.distributed import DistError
    from utils.engine import Interrupted, RunError

    prog = prog or os.path.basename(sys.argv[0])
    rank = os.environ.get("RANK", "0") if _under_torchrun() else "0"
    tag = f"{prog}: " if rank == "0" else f"{prog} [rank {rank}]: "
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # so that logs piped through tee show up as they happen
    outcome = Outcome()
    try:
        with flag_wording("scripts"):  # checkpoint errors name this script's flags, not Python keywords
            yield outcome
    except (CheckpointError, DatasetError, RunError, DistError) as e:
        sys.stdout.flush()
        sys.stderr.write(f"{tag}error: {_one_line(e)}\n")  # one write: ranks' lines do not interleave
        outcome.code = 1
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        message = getattr(e, "message", "") or _INTERRUPTED[what]
        sys.stderr.write(f"{tag}{_one_line(message)}\n")
        if exiting:  # the process ends now: a further Ctrl-C would only interrupt the workers' shutdown
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
        outcome.code = e.exit_code if isinstance(e, Interrupted) else 130


def _one_line(e) -> str:
    text = str(e)
    if "Original Traceback" in text:  # raised in a DataLoader worker: the worker's own message is the last line
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split("\n")).strip()


def train_main(dataset: str, argv: Sequence[str] | None = None, recipe: dict | None = None) -> int:
    """Entry point of the training scripts."""
    args = parse_train_args(dataset, argv, recipe=recipe)
    from utils.train import fit

    with one_line_errors(exiting=argv is None) as outcome:
        fit(args)
    return outcome.code


def eval_main(dataset: str, argv: Sequence[str] | None = None, defaults: dict | None = None) -> int:
    """Entry point of the evaluation scripts."""
    args = parse_eval_args(dataset, argv, defaults=defaults)
    from utils.evaluate import evaluate_checkpoint

    with one_line_errors(exiting=argv is None, what="eval") as outcome:
        evaluate_checkpoint(args)
    return outcome.code
