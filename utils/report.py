"""One table row per training run found under output folders, read from the runs' files (nothing is rerun).

    python -m utils.report ./checkpoint [more folders or -last.pth files]

A run is a ``<stem>-last.pth`` (written every epoch); its best checkpoint ``<stem>.pth`` supplies the test score of a
``--val_split`` run, which is scored on the test set once, at the end."""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

from utils.runlog import duration

COLUMNS = ("run", "model", "S", "U", "lambdaR", "epochs", "best top-1", "val top-1", "test top-1", "time")


def _read(path: str) -> dict | None:
    """The checkpoint's small entries; ``mmap`` so the weights are not read. None for an unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a file being written or from another program: listed as unreadable, not fatal
        return None


def _pct(value) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def run_row(last_path: str) -> dict:
    """The table row of the run whose last checkpoint is ``last_path``."""
    stem = os.path.basename(last_path)[: -len("-last.pth")]
    last = _read(last_path)
    if last is None:
        return dict.fromkeys(COLUMNS, "-") | {"run": stem, "model": "(unreadable)"}
    args = last.get("args") or {}
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
    }


def find_runs(paths: list) -> list:
    """Every ``-last.pth`` under the given folders (recursively) or given directly, sorted, without repeats."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += glob.glob(os.path.join(glob.escape(path), "**", "*-last.pth"), recursive=True)
        elif path.endswith("-last.pth") and os.path.isfile(path):
            found.append(path)
        elif not os.path.exists(path):
            raise SystemExit(f"report: error: {path!r} does not exist: pass the --output_dir of your runs")
        else:
            raise SystemExit(f"report: error: {path!r} is neither a folder nor a -last.pth checkpoint")
    return sorted(set(os.path.abspath(p) for p in found))


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
        help="output folders (searched recursively) or -last.pth files (default: ./checkpoint)",
    )
    runs = find_runs(parser.parse_args(argv).paths)
    if not runs:
        print("report: no runs found (no *-last.pth files); pass the --output_dir of your runs", file=sys.stderr)
        return 1
    print(format_table([run_row(p) for p in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
