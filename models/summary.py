"""Parameter and FLOP counts, the way the paper reports them (SPEC section 8).

Params count a shared basis once. MACs are as ptflops 0.6 counted them for the paper, at batch 1: hooks on conv (with
bias; Conv1d too, ECA), linear, BatchNorm, ReLU/ReLU6 and pooling *modules*, so a shared basis counts on every call
(ptflops 0.7's default backend miscounts shared models: SPEC section 8). FLOPs are 2 x MACs in the paper's README,
1 x MACs in the authors' later one (SPEC_v2 section 6); ``--all`` prints both tables, each in its own convention.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import namedtuple
from functools import partial

import torch
import torch.nn as nn

from .basis import set_fused
from .registry import DATASETS, INPUT_SIZE, get_model, model_rank_args, rank_flags

# One row of the paper's result tables; ranks are the ((arg, value), ...) that build it.
PaperRow = namedtuple(
    "PaperRow", "dataset row model ranks params flops top1_err top5_err note flops_per_mac", defaults=("", "", 2)
)
_S = lambda s, u: (("shared_rank", s), ("unique_rank", u))  # noqa: E731
PAPER_ROWS = (
    PaperRow("cifar100", "ResNet34-S8U1", "ResNet34_SingleShared", _S(8, 1), "5.87M", "0.79G", "23.11%"),
    PaperRow("cifar100", "ResNet34-S16U1", "ResNet34_SingleShared", _S(16, 1), "6.49M", "1.05G", "22.64%"),
    PaperRow("cifar100", "ResNet34-S32U1", "ResNet34_SingleShared", _S(32, 1), "7.73M", "1.55G", "21.79%"),
    PaperRow(
        "cifar100",
        "DenseNet121-S64U4",
        "DenseNet121_SingleShared",
        _S(16, 1),
        "5.08M",
        "1.43G",
        "22.15%",
        note="built with shared_rank=16 unique_rank=1, not the row name's 64/4",
    ),
    PaperRow(
        "cifar100",
        "ResNeXt50-S16U1",
        "ResNext50_SingleShared",
        _S(64, 4),
        "19.3M",
        "2.38G",
        "20.09%",
        note="built with shared_rank=64 unique_rank=4; 16/1 are its basis conv group counts",
    ),
    PaperRow("cifar100", "MobileNetV2-Shared", "MobileNetV2_Shared", (), "2.16M", "0.14G", "27.70%"),
    PaperRow("cifar10", "ResNet32-S8U1", "ResNet32_SingleShared", _S(8, 1), "0.15M", "0.10G", "8.08%"),
    PaperRow("cifar10", "ResNet32-S16U1", "ResNet32_SingleShared", _S(16, 1), "0.20M", "0.16G", "7.43%"),
    PaperRow(
        "cifar10",
        "ResNet32-S16U1*",
        "ResNet32_DoubleShared",
        _S(16, 1),
        "0.24M",
        "0.16G",
        "6.93%",
        note="the authors' code gives 245,642 params (0.25M)",
    ),
    PaperRow("cifar10", "ResNet56-S8U1", "ResNet56_SingleShared", _S(8, 1), "0.20M", "0.17G", "7.52%"),
    PaperRow(
        "cifar10",
        "ResNet56-S16U1",
        "ResNet56_SingleShared",
        _S(16, 1),
        "0.22M",
        "0.30G",
        "7.46%",
        note="the authors' code gives 270,842 params (0.27M)",
    ),
    PaperRow(
        "cifar10",
        "ResNet56-S16U1*",
        "ResNet56_DoubleShared",
        _S(16, 1),
        "0.31M",
        "0.30G",
        "6.30%",
        note="the authors' code gives 319,226 params (0.32M)",
    ),
    PaperRow("ilsvrc", "ResNet34-S32U1*", "ResNet34_DoubleShared", _S(32, 1), "9.76M", "4.98G", "27.20%", "8.93%"),
    PaperRow("ilsvrc", "ResNet34-S48U1*", "ResNet34_DoubleShared", _S(48, 1), "11.79M", "6.52G", "26.67%", "8.54%"),
    PaperRow("ilsvrc", "MobileNetV2-Shared", "MobileNetV2_Shared", (), "3.24M", "0.66G", "27.61%", "9.34%"),
)
# The authors' later README (936a886, SPEC_v2 section 6): FLOPs = 1 x MACs; its "Shared" is the code's _SharedSingle,
# its "Shared++" the code's _Shared. The CIFAR-100 row is from the November 2020 README, when FLOPs were 2 x MACs.
_L = partial(PaperRow, flops_per_mac=1)
LATER_ROWS = (
    _L("ilsvrc", "ResNet50-Shared", "ResNet50_SharedSingle", (), "20.51M", "4.11G", "23.64%", "6.98%"),
    _L("ilsvrc", "ResNet50-Shared++", "ResNet50_Shared", (), "18.26M", "4.11G", "23.95%", "7.14%"),
    _L("ilsvrc", "ResNet101-Shared", "ResNet101_SharedSingle", (), "29.47M", "7.83G", "22.31%", "6.47%"),
    _L(
        "ilsvrc",
        "MobileNetV2-Shared++",
        "MobileNetV2_SharedDouble",
        (),
        "2.98M",
        "0.33G",
        "28.21%",
        "9.85%",
        note="published Nov 2020, before ECA: MobileNetV2_SharedDouble_NoECA has the same 2.98M / 0.33G",
    ),
    PaperRow(
        "cifar100",
        "MobileNetV2-SharedDouble",
        "MobileNetV2_SharedDouble",
        (),
        "1.90M",
        "0.14G",
        "27.54%",
        note="the November 2020 README's row: FLOPs 2 x MACs",
    ),
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs_of(m: nn.Module, inp, out) -> int:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):  # Conv1d: ECA attention
        positions = out.numel() // m.out_channels  # batch x output H x W
        per_position = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
        return per_position * positions + (m.out_channels * positions if m.bias is not None else 0)
    if isinstance(m, nn.Linear):
        return inp[0].numel() * out.shape[-1]
    if isinstance(m, nn.BatchNorm2d):
        return inp[0].numel() * (2 if m.affine else 1)
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return out.numel()
    return inp[0].numel() if isinstance(m, _POOLS) else 0


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple | None = None) -> int:
    """MACs of one forward pass at batch 1 (default: the model's input size), in ptflops 0.6's convention."""
    fused = {m: m.fused for m in model.modules() if hasattr(m, "fused")}
    set_fused(model, False)  # call basis convs as modules so the hooks see them
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += _macs_of(m, inp, out)

    handles = [m.register_forward_hook(hook) for m in model.modules()]  # modules() visits a shared module once
    was_training = model.training
    try:
        model.eval()
        weight = next(model.parameters())
        model(torch.zeros(1, *(input_size or model.cfg.input_size), device=weight.device, dtype=weight.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for m, f in fused.items():
            m.fused = f
    return total


def summarize(name: str, dataset: str, flops_per_mac: int = 2, **ranks) -> dict:
    """Params and FLOPs (``flops_per_mac`` x MACs) of a registered model, as numbers and as a README prints them."""
    model = get_model(name, dataset, **ranks)
    params, macs = count_params(model), count_macs(model)
    return {
        "dataset": dataset,
        "model": name,
        **model.cfg.build_kwargs(),
        "params": params,
        "macs": macs,
        "params_str": f"{params / 1e6:.2f}M",
        "flops_str": f"{flops_per_mac * macs / 1e9:.2f}G",
    }


def paper_table(rows: tuple = PAPER_ROWS) -> list[dict]:
    """Every row of a README table with what this code measures (at the README's precision and convention), flags."""
    table = []
    for r in rows:
        s = summarize(r.model, r.dataset, r.flops_per_mac, **dict(r.ranks))
        digits = len(r.params.rstrip("M").split(".")[1])  # the paper's precision
        params = f"{s['params'] / 1e6:.{digits}f}M"
        table.append(
            {
                **s,
                "row": r.row,
                "paper_params": r.params,
                "paper_flops": r.flops,
                "top1_err": r.top1_err,
                "top5_err": r.top5_err,
                "params_ok": params == r.params,
                "flops_ok": s["flops_str"] == r.flops,
                "flags": f"--model={r.model} {rank_flags(dict(r.ranks))}".strip(),
                "note": r.note,
                "measured_params": params,
            }
        )
    return table


def paper_row(dataset: str, name: str, ranks: dict) -> PaperRow | None:
    """The README row (the paper's first, then the authors' later one) that this model and these ranks reproduce."""
    return next(
        (r for r in PAPER_ROWS + LATER_ROWS if (r.dataset, r.model) == (dataset, name) and dict(r.ranks) == ranks), None
    )


def paper_line(row: PaperRow) -> str:
    """``paper row ResNet50-Shared++: 18.26M params, 4.11G FLOPs (1 x MACs), top-1 err 23.95%, top-5 err 7.14%``."""
    top5 = f", top-5 err {row.top5_err}" if row.top5_err else ""
    return (
        f"paper row {row.row}: {row.params} params, {row.flops} FLOPs ({row.flops_per_mac} x MACs), top-1 err "
        f"{row.top1_err}{top5}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="print every row of the paper's tables")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--model")
    p.add_argument("--shared_rank", type=int)
    p.add_argument("--unique_rank", type=int)
    args = p.parse_args(argv)
    if args.all:
        for title, rows in (
            ("The paper's README (FLOPs = 2 x MACs)", PAPER_ROWS),
            ("The authors' later README (FLOPs = 1 x MACs, except where noted)", LATER_ROWS),
        ):
            head = f"{'dataset':9} {'paper row':24} {'params':>8} {'paper':>7} {'FLOPs':>6} {'paper':>6}  flags"
            print(f"{title}\n{head}\n{'-' * len(head)}")
            for r in paper_table(rows):
                mark = "" if r["params_ok"] else "  *params differ from the paper; matches the authors' code"
                note = f"  ({r['note']})" if r["note"] and rows is LATER_ROWS else ""
                print(
                    f"{r['dataset']:9} {r['row']:24} {r['measured_params']:>8} {r['paper_params']:>7} "
                    f"{r['flops_str']:>6} {r['paper_flops']:>6}  {r['flags']}{mark}{note}"
                )
            print()
        return 0
    if not args.dataset or not args.model:
        p.error("give --all, or --dataset and --model")
    ranks = {k: getattr(args, k) for k in ("shared_rank", "unique_rank") if getattr(args, k) is not None}
    try:
        s = summarize(args.model, args.dataset, **ranks)
    except ValueError as e:
        p.error(str(e))
    print(
        f"{args.dataset} {args.model} {rank_flags({k: s[k] for k in model_rank_args(args.model, args.dataset)})}"
        f"\n  params {s['params']:,} ({s['params_str']})\n  MACs {s['macs']:,}  FLOPs {s['flops_str']} "
        f"(2 x MACs, ptflops-0.6 convention, input {INPUT_SIZE[args.dataset]}; the authors' later README prints "
        f"1 x MACs: {s['macs'] / 1e9:.2f}G)"
    )
    row = paper_row(args.dataset, s["model"], {k: s[k] for k in model_rank_args(args.model, args.dataset)})
    if row is not None:
        print(f"  {paper_line(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
