"""Deployment export: checkpoint -> model -> fold -> ``torch.export`` program (optionally ONNX), checked before saving.

    python -m models.export --dataset cifar10 --model ResNet56_DoubleShared --pretrained ckpt.pth --out r56.pt2

``--onnx`` also writes r56.onnx; ``--no_fold`` keeps the factorised graph. Each file is loaded back, compared with the
*unfolded* model on seeded random batches and renamed into place only within :data:`RTOL`; run it with
``torch.export.load("r56.pt2").module()(images)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

from .atomic import atomic_path
from .folding import fold as fold_model
from .folding import foldable
from .pretrained import error_line, load_model, unwrap_model
from .registry import DATASETS, flag_wording, rank_flags
from .summary import count_macs, count_params

RTOL = 1e-4  # largest accepted |exported - eager| / max|eager|
ONNX_HINT = "ONNX export needs the optional packages onnx and onnxscript: pip install onnx onnxscript"


class ExportError(RuntimeError):
    """The export cannot be done or did not reproduce the model; the message says why."""


class OnnxUnavailableError(ExportError):
    """``onnx=True`` was asked for but the optional ``onnx`` or ``onnxscript`` package is not installed."""


def _onnx_missing() -> bool:
    return any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript"))


def _worst(run, batches: list, refs: list) -> tuple[float, float]:
    """The largest (abs, relative) difference of ``run`` from ``refs``; a nan wins, so that the check fails."""
    diffs = []
    for x, ref in zip(batches, refs):
        out, ref = run(x).detach().float().cpu(), ref.detach().float().cpu()
        abs_diff = (out - ref).abs().max().item()
        diffs.append((abs_diff, abs_diff / max(ref.abs().max().item(), 1e-12)))
    return max(diffs, key=lambda d: (math.isnan(d[1]), d[1]))


def _export(model: nn.Module, example: torch.Tensor, dynamic: bool):
    """``(program, dynamic_batch, note)``: a dynamic batch if it traces (at batch >= 2: sizes 0/1 specialise)."""
    note = ""
    if dynamic:
        traced = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
        try:
            shapes = ({0: torch.export.Dim("batch", min=1)},)
            return torch.export.export(model, (traced,), dynamic_shapes=shapes), True, note
        except Exception as e:  # noqa: BLE001  (any tracing failure: fall back to a fixed batch)
            note = f"dynamic batch failed ({error_line(e)}); "
    return torch.export.export(model, (example,)), False, note + f"fixed batch {example.shape[0]}"


def _check_onnx(path: str, batches: list, refs: list) -> tuple[float | None, float | None]:
    """Validate the file with onnx.checker and, when onnxruntime is installed, run it against ``refs``."""
    import onnx

    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None, None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _worst(lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]), batches, refs)


def _fold(model: nn.Module, fold: bool, batches: list, refs: list, report: dict) -> nn.Module:
    """The model to export (folded when asked and possible); fills the report's fold and size entries."""
    target, report["folded"], report["fold_rel_diff"] = model, False, None
    if fold and foldable(model):
        try:
            target = fold_model(model)
            report["fold_rel_diff"] = _worst(target, batches[:1], refs[:1])[1]
        except Exception as e:  # noqa: BLE001
            raise ExportError(
                f"fold() failed on {type(model).__name__} ({error_line(e)}); a bug in the model's "
                f"folded() blocks: export without folding (fold=False, --no_fold)"
            ) from e
        report["folded"] = True
    elif fold:
        report["note"] = "no foldable blocks: exported as is; "
    report["params_after"] = count_params(target)
    report["macs_after"] = count_macs(target, report["input_size"]) if target is not model else report["macs_before"]
    if report["macs_after"] > report["macs_before"]:
        report["note"] += (
            "folding adds MACs here (at low ranks dense convs cost more than basis + coefficients): "
            "time both forms (fold=False / --no_fold) on the target hardware; "
        )
    return target


def _save_checked(program, onnx: bool, batches: list, refs: list, rtol: float, report: dict) -> None:
    """Each file is renamed into place only once its own check passed."""
    with atomic_path(report["out"], ".pt2") as tmp:
        torch.export.save(program, tmp)
        report["max_abs_diff"], report["max_rel_diff"] = worst = _worst(torch.export.load(tmp).module(), batches, refs)
        if not worst[1] <= rtol:  # also catches nan
            folding = (
                f"folded; the eager folded model alone differs by {report['fold_rel_diff']:.3g}"
                if report["folded"]
                else "not folded"
            )
            raise ExportError(
                f"the exported program differs from the model: max relative difference {worst[1]:.3g} "
                f"> {rtol:g} (max abs {worst[0]:.3g}; {folding}); nothing written"
            )
        if onnx:
            onnx_out = os.path.splitext(report["out"])[0] + ".onnx"
            with atomic_path(onnx_out, ".onnx") as tmp_onnx:
                try:  # the dynamo exporter (onnxscript), on the checked program
                    torch.onnx.export(
                        program,
                        f=tmp_onnx,
                        dynamo=True,
                        external_data=False,
                        verbose=False,
                        input_names=["input"],
                        output_names=["logits"],
                    )
                except Exception as e:  # noqa: BLE001
                    raise ExportError(f"ONNX export failed ({error_line(e)}); {ONNX_HINT}") from e
                checked = _check_onnx(tmp_onnx, batches, refs)
                report["onnx_max_abs_diff"], report["onnx_max_rel_diff"] = checked
                if checked[1] is not None and not checked[1] <= rtol:
                    raise ExportError(
                        f"the ONNX model differs from the model: max relative difference "
                        f"{checked[1]:.3g} > {rtol:g}; nothing written"
                    )
            report["onnx"] = onnx_out


@torch.no_grad()
def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    example_input: torch.Tensor,
    fold: bool = True,
    onnx: bool = False,
    dynamic_batch: bool = True,
    num_batches: int = 3,
    seed: int = 0,
    rtol: float = RTOL,
) -> dict:
    """Fold an eval-mode ``model``, export it to ``out`` (and ``<out stem>.onnx``), check the saved files; returns the
    report. Check batches have the example's size (also 1 and one more when dynamic); ExportError: nothing written."""
    model = unwrap_model(model)
    if model.training:
        raise ValueError(
            "export_model() exports an inference graph, but the model is in training mode (BatchNorm "
            "would use batch statistics): call model.eval() first"
        )
    if onnx and _onnx_missing():
        raise OnnxUnavailableError(ONNX_HINT)
    input_size = tuple(example_input.shape[1:])
    report = {
        "out": os.fspath(out),
        "onnx": None,
        "onnx_max_abs_diff": None,
        "onnx_max_rel_diff": None,
        "input_size": input_size,
        "params_before": count_params(model),
        "macs_before": count_macs(model, input_size),
        "note": "",
    }
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n0 = example_input.shape[0]

    def draw(sizes):
        batches = [
            torch.randn(n, *input_size, generator=gen).to(example_input.device, example_input.dtype)
            for n in (sizes * num_batches)[:num_batches]
        ]
        return batches, [model(x) for x in batches]

    batches, refs = draw([n0, 1, n0 + 1] if dynamic_batch else [n0])
    target = _fold(model, fold, batches, refs, report)
    try:
        program, report["dynamic_batch"], note = _export(target, example_input, dynamic_batch)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export failed on {type(model).__name__}: {error_line(e)}") from e
    report["note"] += note
    if not report["dynamic_batch"]:
        batches, refs = draw([n0])
    report["batch_sizes"] = [x.shape[0] for x in batches]
    _save_checked(program, onnx, batches, refs, rtol, report)
    report["note"] = report["note"].rstrip("; ")
    return report


PROG = "python -m models.export"


def _print_report(args, model: nn.Module, r: dict) -> None:
    def count(key: str) -> str:
        before, after = r[f"{key}_before"], r[f"{key}_after"]
        return f"{before:,} ({before / 1e6:.2f}M) -> {after:,} ({after / 1e6:.2f}M)"

    batch = "dynamic batch" if r["dynamic_batch"] else f"fixed batch {args.batch_size}"
    cfg = model.cfg
    print(
        f"exported {cfg.dataset} {cfg.name} {rank_flags(cfg.build_kwargs())}".rstrip() + f" -> {r['out']} "
        f"({batch}, input {'x'.join(map(str, r['input_size']))}, {'folded' if r['folded'] else 'not folded'})"
    )
    print(f"  params   {count('params')}\n  MACs     {count('macs')}  (batch 1)")
    print(
        f"  check    passed: max rel diff {r['max_rel_diff']:.2e} (limit {RTOL:g}; max abs diff "
        f"{r['max_abs_diff']:.2e}) on {len(r['batch_sizes'])} random batches {r['batch_sizes']} vs the unfolded model"
    )
    if r["onnx"]:
        checked = (
            f"max rel diff {r['onnx_max_rel_diff']:.2e}"
            if r["onnx_max_rel_diff"] is not None
            else "outputs not checked: pip install onnxruntime"
        )
        print(f"  onnx     {r['onnx']} ({checked})")
    if r["note"]:
        print(f"  note     {r['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, help="default: read from the checkpoint (the authors' files need it)")
    p.add_argument("--model", help="e.g. ResNet56_DoubleShared; default: read from the checkpoint")
    p.add_argument("--shared_rank", type=int, help="default: read from the checkpoint")
    p.add_argument("--unique_rank", type=int, help="default: read from the checkpoint")
    p.add_argument("--pretrained", required=True, help="checkpoint to export (the authors' or this project's)")
    p.add_argument("--out", required=True, help="the .pt2 file to write (with --onnx also <out>.onnx)")
    p.add_argument("--onnx", action="store_true", help="also write ONNX (pip install onnx onnxscript)")
    p.add_argument("--no_fold", action="store_true", help="export the factorised graph without folding")
    p.add_argument("--batch_size", type=int, default=2, help="batch of the example and the check (stays dynamic)")
    args = p.parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}")
        with flag_wording("flags"):  # errors name this command's flags (--dataset, --model), not Python keywords
            model, _ = load_model(
                args.pretrained,
                model=args.model,
                dataset=args.dataset,
                shared_rank=args.shared_rank,
                unique_rank=args.unique_rank,
            )
        example = torch.randn(args.batch_size, *model.cfg.input_size, generator=torch.Generator().manual_seed(0))
        report = export_model(model, args.out, example_input=example, fold=not args.no_fold, onnx=args.onnx)
    except (ValueError, ExportError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    _print_report(args, model, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
