"""One table row per training run or checkpoint found under output folders, read from the files (nothing is rerun).

    python -m utils.report ./checkpoint [more folders or .pth files]

A run is a ``<stem>-last.pth`` (written every epoch); its best checkpoint ``<stem>.pth`` supplies the test score of a
``--val_split`` run, which is scored on the test set once, at the end. Any other ``.pth`` (the authors' published
files, a best file without its run) is one row too, its model and ranks read off the tensor shapes when not recorded;
a file that cannot be read is a row that says so."""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

from models.pretrained import checkpoint_acc, guess_fit, state_dict_of
from utils.runlog import duration

COLUMNS = ("run", "model", "S", "U", "lambdaR", "epochs", "best top-1", "val top-1", "test top-1", "time", "folder")


def _read(path: str) -> dict | None:
    """The checkpoint dict; ``mmap`` so the weights are not read. None for an unreadable file or one that holds no
    dict (a file being written or from another program: listed as unreadable, not fatal)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        return None
    return obj if isinstance(obj, dict) else None


def _dict(value) -> dict:
    """A hand-edited field that should be a dict but is not reads as empty."""
    return value if isinstance(value, dict) else {}


def _unreadable(name: str, path: str) -> dict:
    return dict.fromkeys(COLUMNS, "-") | {"run": name, "model": "(unreadable)", "folder": _folder(path)}


def _folder(path: str) -> str:
    """The file's folder, relative to the working directory when below it."""
    folder = os.path.dirname(os.path.abspath(path))
    relative = os.path.relpath(folder)
    return folder if relative.startswith("..") else relative


def _pct(value) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def run_row(last_path: str) -> dict:
    """The table row of the run whose last checkpoint is ``last_path``."""
    stem = os.path.basename(last_path)[: -len("-last.pth")]
    last = _read(last_path)
    if last is None:
        return _unreadable(stem, last_path)
    try:
        return _run_row(last_path, stem, last)
    except Exception:  # noqa: BLE001  (a hand-edited field of another type: this row only)
        return _unreadable(stem, last_path)


def _run_row(last_path: str, stem: str, last: dict) -> dict:
    args = _dict(last.get("args"))
    done = f"{last.get('epoch', 0)}/{args.get('epochs', '?')}"
    if last.get("epoch_step"):
        done += f" +{last['epoch_step']} steps"
    best_acc = last.get("best_acc")
    best = f"{_pct(best_acc)} (ep {last['best_epoch']})" if last.get("best_epoch") else _pct(best_acc)
    on_val = last.get("selection") == "val"
    test = best_acc
    if on_val:  # scored once at the end, into the best checkpoint (the last one if no epoch scored above 0%)
        best_file = _read(os.path.join(os.path.dirname(last_path), stem + ".pth")) or {}
        test = last.get("test_acc") if last.get("best_epoch") is None else best_file.get("test_acc")
    return {
        "run": stem,
        "model": args.get("model", "?"),
        "S": args.get("shared_rank", "-"),
        "U": args.get("unique_rank", "-"),
        "lambdaR": args.get("lambdaR", "-"),
        "epochs": done,
        "best top-1": best,
        "val top-1": _pct(best_acc) if on_val else "-",
        "test top-1": _pct(test),
        "time": "-" if last.get("train_seconds") is None else duration(last["train_seconds"]),
        "folder": _folder(last_path),
    }


def checkpoint_row(path: str) -> dict:
    """The row of a checkpoint without a run: the authors' files (model and ranks read off the tensor shapes) or a
    best file of this project's whose ``-last.pth`` is gone (its record)."""
    name = os.path.basename(path)[: -len(".pth")]
    ckpt = _read(path)
    if ckpt is None:
        return _unreadable(name, path)
    try:
        model, ranks = ckpt.get("model"), _dict(ckpt.get("model_kwargs"))
        if not isinstance(model, str):
            fit = guess_fit(state_dict_of(ckpt)) or {}
            model = f"{fit.pop('dataset')}/{fit.pop('model')}" if fit else "(unknown layout)"
            ranks = fit
        acc, epoch = checkpoint_acc(ckpt), ckpt.get("epoch")
        return dict.fromkeys(COLUMNS, "-") | {
            "run": name,
            "model": model,
            "S": ranks.get("shared_rank", "-"),
            "U": ranks.get("unique_rank", "-"),
            "lambdaR": _dict(ckpt.get("args")).get("lambdaR", "-"),
            "epochs": "-" if epoch is None else str(epoch),
            "best top-1": _pct(acc) if epoch is None else f"{_pct(acc)} (ep {epoch})",
            "test top-1": _pct(ckpt.get("test_acc", acc)),
            "folder": _folder(path),
        }
    except Exception:  # noqa: BLE001  (not a state_dict, hand-edited fields: this row only)
        return _unreadable(name, path)


def find_checkpoints(paths: list) -> list:
    """Every ``.pth`` under the given folders (recursively) or given directly, sorted, without repeats."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += glob.glob(os.path.join(glob.escape(path), "**", "*.pth"), recursive=True)
        elif path.endswith(".pth") and os.path.isfile(path):
            found.append(path)
        elif not os.path.exists(path):
            raise SystemExit(f"report: error: {path!r} does not exist: pass the --output_dir of your runs")
        else:
            raise SystemExit(f"report: error: {path!r} is neither a folder nor a .pth checkpoint")
    return sorted(set(os.path.abspath(p) for p in found))


def rows(files: list) -> list:
    """A run row per ``-last.pth``, a checkpoint row per other file except the best files of those runs."""
    runs = {p[: -len("-last.pth")] + ".pth" for p in files if p.endswith("-last.pth")}
    return [run_row(p) if p.endswith("-last.pth") else checkpoint_row(p) for p in files if p not in runs]


def format_table(rows: list) -> str:
    cells = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths",
        nargs="*",
        default=["./checkpoint"],
        help="output folders (searched recursively) or .pth files (default: ./checkpoint)",
    )
    files = find_checkpoints(parser.parse_args(argv).paths)
    if not files:
        print("report: no checkpoints found (no *.pth files); pass the --output_dir of your runs", file=sys.stderr)
        return 1
    print(format_table(rows(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
