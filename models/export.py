"""Deployment export: build a model from a checkpoint, fold it, save a ``torch.export`` program (and optionally ONNX).

Command line (ranks are read from the checkpoint when not given)::

    python -m models.export --dataset cifar10 --model ResNet56_DoubleShared --pretrained ckpt.pth --out r56.pt2
    python -m models.export ... --onnx        # also r56.onnx (needs: pip install onnx onnxscript)
    python -m models.export ... --no_fold     # export the factorised graph as trained

What it does, in order:

1. builds the model (:func:`build_model`: ranks from the caller, else from the checkpoint's ``model_kwargs``, else
   read off the tensor shapes), loads the weights strictly and switches to eval mode;
2. folds it (:func:`models.fold`) when any block is foldable: factorised convs become dense convs whose bias is
   absorbed by BatchNorm; models without foldable blocks are exported as they are;
3. exports with :func:`torch.export.export`, with a dynamic batch dimension (fixed batch if that fails), and saves
   the program with :func:`torch.export.save`;
4. loads the saved file back, runs it and the *unfolded* model on a few seeded random batches and refuses the result
   (no file written) when the largest difference, relative to the largest output magnitude, exceeds ``1e-4``.

Files appear only after they have passed that check (written to a temporary name, then renamed). The Python entry
point is :func:`export_model`; the exported program is used as::

    program = torch.export.load("r56.pt2")
    logits = program.module()(images)          # any batch size when the report says dynamic_batch
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from models.fold import fold as fold_model
from models.registry import DATASETS, get_model, list_models, rank_flags
from models.summary import count_macs, count_params
from utils.checkpoint import load_weights, read_checkpoint, resolve_model, unwrap_model

RTOL = 1e-4  # largest accepted |exported - eager| / max|eager|
ONNX_HINT = "ONNX export needs the optional packages onnx and onnxscript: pip install onnx onnxscript"

__all__ = ["ExportError", "OnnxUnavailableError", "RTOL", "build_model", "datasets_of", "export_model", "main"]


class ExportError(RuntimeError):
    """The export cannot be done or did not reproduce the model; the message says why."""


class OnnxUnavailableError(ExportError):
    """``onnx=True`` was asked for but the optional ``onnx`` package is not installed."""


# ---------------------------------------------------------------------------------------------------------------------
# Building a model from a checkpoint (shared with hubconf.py)
# ---------------------------------------------------------------------------------------------------------------------

def datasets_of(name: str) -> list[str]:
    """The datasets ``name`` is registered for, in :data:`DATASETS` order."""
    return [d for d in DATASETS if name in list_models(d)]


def build_model(name: str, dataset: Optional[str] = None, *, shared_rank: Optional[int] = None,
                unique_rank: Optional[int] = None, num_classes: Optional[int] = None,
                checkpoint: Union[str, os.PathLike, dict, None] = None) -> nn.Module:
    """Build registered model ``name`` and, when ``checkpoint`` is given, load its weights (strictly).

    Args:
        name: the paper's model name, e.g. ``"ResNet56_DoubleShared"``.
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"ilsvrc"``; may be omitted when ``name`` exists for one dataset
            only, or when the checkpoint records its dataset.
        shared_rank, unique_rank: ranks; each one not given is taken from the checkpoint (its recorded
            ``model_kwargs``, else read off its tensor shapes), else the model's default.
        num_classes: another class count (a new head); with a checkpoint it must match the file.
        checkpoint: local path, or an already loaded checkpoint dict / state_dict. Both the authors' files
            (``net_state_dict``, DataParallel ``module.`` prefixes) and this project's are accepted.

    Returns:
        the model, in the mode ``nn.Module`` starts in (train): call ``.eval()`` before predicting.

    Raises:
        ValueError: unknown name, a dataset that is missing or ambiguous, ranks the model does not take.
        utils.checkpoint.CheckpointError: unreadable file, a file of another model or dataset, or shapes that do not
            fit (the message names the rank flags the file was trained with).
    """
    registered = datasets_of(name)
    if not registered:
        raise ValueError(f"unknown model {name!r}; registered names: "
                         f"{', '.join(sorted({n.split('/')[1] for n in list_models()}))}")
    obj, where = None, "checkpoint"
    if checkpoint is not None:
        if isinstance(checkpoint, dict):
            obj = checkpoint
        else:
            where = os.fspath(checkpoint)
            obj = read_checkpoint(where)
    recorded_ds = obj.get("dataset") if obj is not None and isinstance(obj.get("dataset"), str) else None
    if dataset is None:
        if recorded_ds is not None:
            dataset = recorded_ds
        elif len(registered) == 1:
            dataset = registered[0]
        else:
            raise ValueError(f"{name} exists for {' and '.join(registered)}: pass dataset= one of them")
    if obj is None:
        return get_model(name, dataset, shared_rank=shared_rank, unique_rank=unique_rank, num_classes=num_classes)
    if num_classes is not None:
        raise ValueError("num_classes builds a new head; a checkpoint fixes the head it was trained with")
    # One implementation of "which model does this file hold": utils.checkpoint.resolve_model (recorded model and
    # ranks for this project's files, ranks read off the shapes for the authors').
    model, _ = resolve_model(obj, where, model=name, dataset=dataset, shared_rank=shared_rank,
                             unique_rank=unique_rank)
    load_weights(model, obj)
    return model.train()


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------

def _has_foldable(model: nn.Module) -> bool:
    return any(callable(getattr(m, "folded", None)) for m in model.modules() if m is not model)


def _onnx_missing() -> list[str]:
    return [p for p in ("onnx",) if importlib.util.find_spec(p) is None]


def _temp_path(out: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # the permissions open() would give, not mkstemp's 0600
    return tmp


def _unlink(path: Optional[str]) -> None:  # a missing file is fine
    if path and os.path.exists(path):
        os.unlink(path)


def _worst(diffs) -> tuple[float, float]:
    """The (abs, rel) pair with the largest relative difference; nan wins (it must fail the check)."""
    diffs = list(diffs)
    for d in diffs:
        if d[1] != d[1]:
            return d
    return max(diffs, key=lambda d: d[1])


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, that divided by max |ref|)."""
    abs_diff = (out.detach().float() - ref.detach().float()).abs().max().item()
    scale = ref.detach().float().abs().max().item()
    return abs_diff, abs_diff / max(scale, 1e-12)


def _export(model: nn.Module, example: torch.Tensor, dynamic: bool):
    """torch.export with a dynamic batch dimension (traced at batch >= 2, since sizes 0/1 specialise), else fixed.

    Returns ``(program, dynamic_batch, note)``.
    """
    from torch.export import Dim

    note = ""
    if dynamic:
        traced = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=({0: Dim("batch", min=1)},))
            return program, True, note
        except Exception as e:  # noqa: BLE001  (any tracing failure: fall back to a fixed batch)
            note = f"dynamic batch failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
    return torch.export.export(model, (example,)), False, note + f"fixed batch {example.shape[0]}"


def _export_onnx(program, model: nn.Module, example: torch.Tensor, dynamic: bool, path: str) -> str:
    """ONNX from the exported program (dynamo exporter, needs onnxscript), else the legacy TorchScript exporter."""
    import warnings

    errors = []
    if importlib.util.find_spec("onnxscript") is not None:
        try:
            torch.onnx.export(program, f=path, dynamo=True, external_data=False, verbose=False,
                              input_names=["input"], output_names=["logits"])
            return "dynamo"
        except Exception as e:  # noqa: BLE001
            errors.append(f"dynamo: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    else:
        errors.append("dynamo: onnxscript is not installed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)
        return "legacy"
    except Exception as e:  # noqa: BLE001
        errors.append(f"legacy: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise ExportError(f"ONNX export failed ({'; '.join(errors)}); {ONNX_HINT}")


def _check_onnx(path: str, batches: list, refs: list) -> Optional[tuple[float, float]]:
    """Run the ONNX file with onnxruntime when it is installed; else only validate it with onnx.checker."""
    import onnx

    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _worst(_compare(torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0]), ref.cpu())
                  for x, ref in zip(batches, refs))


def _fold_summary(report: dict) -> str:
    if not report["folded"]:
        return "not folded"
    return f"folded; the eager folded model alone differs by {report['fold_rel_diff']:.3g}"


@torch.no_grad()
def export_model(model: nn.Module, out: Union[str, os.PathLike], *, example_input: torch.Tensor, fold: bool = True,
                 onnx: bool = False, dynamic_batch: bool = True, num_batches: int = 3, seed: int = 0,
                 rtol: float = RTOL) -> dict:
    """Fold ``model`` (when ``fold`` and a block is foldable), export it with ``torch.export`` to ``out``, check it.

    The saved program is loaded back and run, with the unfolded ``model``, on ``num_batches`` random batches drawn
    with ``seed`` (batch sizes: the example's, 1 and one more when the batch is dynamic; the example's otherwise).

    Args:
        model: an eval-mode model (training-mode models are refused).
        out: the ``.pt2`` file to write.
        example_input: an input of the shape to export, e.g. ``torch.randn(2, 3, 32, 32)``; dims after the batch are
            fixed in the exported program.
        fold: fold factorised convs into dense ones first (same outputs, plain-network speed).
        onnx: also write ``<out without suffix>.onnx`` (needs the optional ``onnx`` package; ``onnxscript`` for the
            dynamo exporter, ``onnxruntime`` to check its outputs too).
        dynamic_batch: try a dynamic batch dimension (falls back to a fixed one if tracing fails).
        rtol: largest accepted max|exported - model| / max|model|.

    Returns:
        the report: ``out``, ``onnx`` (path or None), ``folded``, ``dynamic_batch``, ``note``, ``params_before``,
        ``params_after``, ``macs_before``, ``macs_after``, ``fold_rel_diff``, ``max_abs_diff``, ``max_rel_diff``,
        ``onnx_max_abs_diff``/``onnx_max_rel_diff`` (None when onnxruntime is not installed), ``batch_sizes``.

    Raises:
        ValueError: the model is in training mode.
        OnnxUnavailableError: ``onnx=True`` without the ``onnx`` package (nothing is written).
        ExportError: folding or exporting failed, or the outputs differ by more than ``rtol`` (nothing is written).
    """
    model = unwrap_model(model)
    if model.training:
        raise ValueError("export_model() exports an inference graph, but the model is in training mode (BatchNorm "
                         "would normalise with batch statistics and update its running averages): call model.eval() "
                         "first")
    if onnx and _onnx_missing():
        raise OnnxUnavailableError(ONNX_HINT)
    out = os.fspath(out)
    input_size = tuple(example_input.shape[1:])
    report = {"out": out, "onnx": None, "onnx_max_abs_diff": None, "onnx_max_rel_diff": None,
              "input_size": input_size, "params_before": count_params(model),
              "macs_before": count_macs(model, input_size), "note": ""}

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n0 = example_input.shape[0]
    sizes = [n0, 1, n0 + 1] if dynamic_batch else [n0]
    sizes = (sizes * num_batches)[:num_batches]
    batches = [torch.randn(n, *input_size, generator=gen).to(example_input.device, example_input.dtype) for n in sizes]
    refs = [model(x) for x in batches]

    target, report["folded"], report["fold_rel_diff"] = model, False, None
    if fold and _has_foldable(model):
        try:
            target = fold_model(model)
            folded_out = target(batches[0])
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"fold() failed on {type(model).__name__} ({type(e).__name__}: {e}); this is a bug in "
                              f"the model's folded() blocks: export without folding (fold=False, --no_fold)") from e
        report["folded"], report["fold_rel_diff"] = True, _compare(folded_out, refs[0])[1]
    elif fold:
        report["note"] = "no foldable blocks: exported as is; "
    report["params_after"] = count_params(target)
    report["macs_after"] = count_macs(target, input_size) if target is not model else report["macs_before"]
    if report["macs_after"] > report["macs_before"]:
        report["note"] += ("folding adds MACs here (at low ranks dense convs cost more than basis + coefficients): "
                           "time both forms (fold=False / --no_fold) on the target hardware; ")

    try:
        program, report["dynamic_batch"], note = _export(target, example_input, dynamic_batch)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
    report["note"] += note
    if not report["dynamic_batch"]:
        batches = [torch.randn(n0, *input_size, generator=gen).to(example_input.device, example_input.dtype)
                   for _ in range(num_batches)]
        refs = [model(x) for x in batches]
    report["batch_sizes"] = [x.shape[0] for x in batches]

    tmp = tmp_onnx = None
    try:
        tmp = _temp_path(out, ".pt2")
        torch.export.save(program, tmp)
        runnable = torch.export.load(tmp).module()
        worst = _worst(_compare(runnable(x), ref) for x, ref in zip(batches, refs))
        report["max_abs_diff"], report["max_rel_diff"] = worst
        if not worst[1] <= rtol:  # also catches nan
            raise ExportError(f"the exported program differs from the model: max relative difference {worst[1]:.3g} "
                              f"> {rtol:g} (max abs {worst[0]:.3g}; {_fold_summary(report)}); nothing written")
        if onnx:
            onnx_out = os.path.splitext(out)[0] + ".onnx"
            tmp_onnx = _temp_path(onnx_out, ".onnx")
            report["onnx_exporter"] = _export_onnx(program, target, example_input, report["dynamic_batch"], tmp_onnx)
            checked = _check_onnx(tmp_onnx, batches, refs)
            report["onnx_max_abs_diff"], report["onnx_max_rel_diff"] = checked if checked else (None, None)
            if checked and not checked[1] <= rtol:
                raise ExportError(f"the ONNX model differs from the model: max relative difference {checked[1]:.3g} "
                                  f"> {rtol:g}; nothing written")
            os.replace(tmp_onnx, onnx_out)
            report["onnx"] = onnx_out
        os.replace(tmp, out)
    finally:  # after a success both were renamed; after a failure nothing is left behind
        _unlink(tmp)
        _unlink(tmp_onnx)
    report["note"] = report["note"].rstrip("; ")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

PROG = "python -m models.export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_positive_int.__name__ = "positive int"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fold a trained model and export it with torch.export (.pt2), optionally "
                                       "ONNX; the saved program is checked against the unfolded model.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--model", required=True, help="model name, e.g. ResNet56_DoubleShared")
    p.add_argument("--shared_rank", type=_positive_int, help="default: read from the checkpoint")
    p.add_argument("--unique_rank", type=_positive_int, help="default: read from the checkpoint")
    p.add_argument("--pretrained", required=True, help="checkpoint to export (the authors' or this project's)")
    p.add_argument("--out", required=True, help="the .pt2 file to write (with --onnx also <out>.onnx)")
    p.add_argument("--onnx", action="store_true", help="also write ONNX (pip install onnx onnxscript)")
    p.add_argument("--no_fold", action="store_true", help="export the factorised graph without folding")
    p.add_argument("--batch_size", type=_positive_int, default=2,
                   help="batch of the example input and of the check (default 2; the batch stays dynamic)")
    return p


def _fmt_count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = build_model(args.model, args.dataset, shared_rank=args.shared_rank, unique_rank=args.unique_rank,
                            checkpoint=args.pretrained).eval()
        example = torch.randn(args.batch_size, *model.cfg.input_size, generator=torch.Generator().manual_seed(0))
        r = export_model(model, args.out, example_input=example, fold=not args.no_fold, onnx=args.onnx)
    except (ValueError, ExportError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    ranks = rank_flags(model.cfg.build_kwargs())
    batch = "dynamic batch" if r["dynamic_batch"] else f"fixed batch {args.batch_size}"
    print(f"exported {args.dataset} {args.model} {ranks}".rstrip() + f" -> {r['out']} ({batch}, input "
          f"{'x'.join(map(str, r['input_size']))}, {'folded' if r['folded'] else 'not folded'})")
    if r["onnx"]:
        print(f"  onnx     {r['onnx']} ({r['onnx_exporter']} exporter"
              + (f", max rel diff {r['onnx_max_rel_diff']:.2e})" if r["onnx_max_rel_diff"] is not None
                 else "; outputs not checked: pip install onnxruntime)"))
    print(f"  params   {_fmt_count(r['params_before'])} -> {_fmt_count(r['params_after'])}")
    print(f"  MACs     {_fmt_count(r['macs_before'])} -> {_fmt_count(r['macs_after'])}  (batch 1)")
    print(f"  check    {len(r['batch_sizes'])} random batches {r['batch_sizes']} vs the unfolded model: max abs diff "
          f"{r['max_abs_diff']:.2e}, max rel diff {r['max_rel_diff']:.2e} (limit {RTOL:g})")
    if r["note"]:
        print(f"  note     {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
