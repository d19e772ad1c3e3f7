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

# Where the published checkpoints are: the only place this project spells their URLs. The six CIFAR-10 files are in
# the authors' git history at this commit; all fifteen are on Google Drive (the links of the paper's README).
GITHUB_RAW = (
    "https://raw.githubusercontent.com/ssregibility/Net_RL2/f044af38186dd6aceb4906d510d6342b6771b90c/pretrained/"
)
DRIVE_DOWNLOAD = "https://drive.google.com/uc?export=download&id="
DRIVE_VIEW = "https://drive.google.com/file/d/{}/view"


class Weights(namedtuple("Weights", "file drive_id size sha256 on_github", defaults=(None, None, False))):
    """A row's published checkpoint: its file name (the authors' for the six CIFAR-10 files, which are also on
    GitHub; chosen here in their style for the Drive-only ones), Google Drive id, size in bytes and sha256 (known
    for the GitHub files only)."""

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to download it, in the order tried: GitHub (a stable URL), then Google Drive."""
        return ((GITHUB_RAW + self.file,) if self.on_github else ()) + (DRIVE_DOWNLOAD + self.drive_id,)

    @property
    def browser_url(self) -> str:
        """The link a person opens to download it by hand."""
        return GITHUB_RAW + self.file if self.on_github else DRIVE_VIEW.format(self.drive_id)


_G = partial(Weights, on_github=True)
# One row of the paper's result tables; ranks are the ((arg, value), ...) that build it; weights: its published file.
PaperRow = namedtuple(
    "PaperRow",
    "dataset row model ranks params flops top1_err top5_err note flops_per_mac weights",
    defaults=("", "", 2, None),
)
_S = lambda s, u: (("shared_rank", s), ("unique_rank", u))  # noqa: E731
PAPER_ROWS = (
    PaperRow(
        "cifar100",
        "ResNet34-S8U1",
        "ResNet34_SingleShared",
        _S(8, 1),
        "5.87M",
        "0.79G",
        "23.11%",
        weights=Weights("CIFAR100_ResNet34_S8U1_23.11err.pth", "1x98ur2Z6HHAaUWKeYPlqrN1VFbySXKqd"),
    ),
    PaperRow(
        "cifar100",
        "ResNet34-S16U1",
        "ResNet34_SingleShared",
        _S(16, 1),
        "6.49M",
        "1.05G",
        "22.64%",
        weights=Weights("CIFAR100_ResNet34_S16U1_22.64err.pth", "18ROzpBVNoIcmqMrwOQ8C9-32XuKghaFD"),
    ),
    PaperRow(
        "cifar100",
        "ResNet34-S32U1",
        "ResNet34_SingleShared",
        _S(32, 1),
        "7.73M",
        "1.55G",
        "21.79%",
        weights=Weights("CIFAR100_ResNet34_S32U1_21.79err.pth", "1DsYNhRBeqAkDGRZGa7oRXHjC0NU9M_f_"),
    ),
    PaperRow(
        "cifar100",
        "DenseNet121-S64U4",
        "DenseNet121_SingleShared",
        _S(16, 1),
        "5.08M",
        "1.43G",
        "22.15%",
        note="built with shared_rank=16 unique_rank=1, not the row name's 64/4",
        weights=Weights("CIFAR100_DenseNet121_S64U4_22.15err.pth", "1FeLPbEAkkrT2bZTvnCrNOU3dkJxrp3-D"),
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
        weights=Weights("CIFAR100_ResNeXt50_S16U1_20.09err.pth", "1e7UlAOFqN0sMwA4jy6tvAzZsvKYpXA6e"),
    ),
    PaperRow(
        "cifar100",
        "MobileNetV2-Shared",
        "MobileNetV2_Shared",
        (),
        "2.16M",
        "0.14G",
        "27.70%",
        weights=Weights("CIFAR100_MobileNetV2_Shared_27.70err.pth", "1JjPHAYbEvIjg869ZysPeGI2IAwOoTe58"),
    ),
    PaperRow(
        "cifar10",
        "ResNet32-S8U1",
        "ResNet32_SingleShared",
        _S(8, 1),
        "0.15M",
        "0.10G",
        "8.08%",
        weights=_G(
            "CIFAR10_ResNet32_S8U1_8.08err.pth",
            "1X-L2JLkENiRkQ17h5bfi7zrVIBj3_yx8",
            1304202,
            "185a6171e02568d493efcff7b3b66e1c373a16272ac5ec06eb2eced6e5fc94e1",
        ),
    ),
    PaperRow(
        "cifar10",
        "ResNet32-S16U1",
        "ResNet32_SingleShared",
        _S(16, 1),
        "0.20M",
        "0.16G",
        "7.43%",
        weights=_G(
            "CIFAR10_ResNet32_S16U1_7.43err.pth",
            "1svowDpevZCeOvgMzHSrwwOgBFBu383g-",
            1680358,
            "b2655776ab427765ef6751c7ad455cf607ef59b0c6a307ecede2fea8e7f66df1",
        ),
    ),
    PaperRow(
        "cifar10",
        "ResNet32-S16U1*",
        "ResNet32_DoubleShared",
        _S(16, 1),
        "0.24M",
        "0.16G",
        "6.93%",
        note="the authors' code gives 245,642 params (0.25M)",
        weights=_G(
            "CIFAR10_ResNet32_Double_S16U1_6.93err.pth",
            "1lGqQJEjMVr-ruMV61byFAPJVFJwU2xEU",
            2070667,
            "2b31e2705d2589103740def51f4692aa9cd92545c15cd8d51b3e0ed09695dbee",
        ),
    ),
    PaperRow(
        "cifar10",
        "ResNet56-S8U1",
        "ResNet56_SingleShared",
        _S(8, 1),
        "0.20M",
        "0.17G",
        "7.52%",
        weights=_G(
            "CIFAR10_ResNet56_S8U1_7.52err.pth.pth",
            "1e77A4ALCVgbN2FwB6bE6I-A2tfUKKcV3",
            1799211,
            "ef056837ba6e6f7009eb254d32f29afd88dd0b83ec427f99513a4cf511c09d8f",
        ),
    ),
    PaperRow(
        "cifar10",
        "ResNet56-S16U1",
        "ResNet56_SingleShared",
        _S(16, 1),
        "0.22M",
        "0.30G",
        "7.46%",
        note="the authors' code gives 270,842 params (0.27M)",
        weights=_G(
            "CIFAR10_ResNet56_S16U1_7.46err.pth.pth",
            "1QBdflDIqV254P1sKEeLSVGjnHpn-KPGi",
            2358073,
            "0b42e649f1a52de78e04f20eea89f6faa55affcd3686d79399c349265d894f1e",
        ),
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
        weights=_G(
            "CIFAR10_ResNet56_Double_S16U1_6.30err.pth",
            "1CMtt0vOWQcJXKJ98zfRx00XjOEiZEFAD",
            2751687,
            "889c13b2fad03351233c11b77dc417cf2ccd6d3533ffc1eb25202b27e6f7c38d",
        ),
    ),
    PaperRow(
        "ilsvrc",
        "ResNet34-S32U1*",
        "ResNet34_DoubleShared",
        _S(32, 1),
        "9.76M",
        "4.98G",
        "27.20%",
        "8.93%",
        weights=Weights("ILSVRC_ResNet34_Double_S32U1_27.20err.pth", "1LG-dSNjg_VrfimhoDyICU5OGir0tYdyz"),
    ),
    PaperRow(
        "ilsvrc",
        "ResNet34-S48U1*",
        "ResNet34_DoubleShared",
        _S(48, 1),
        "11.79M",
        "6.52G",
        "26.67%",
        "8.54%",
        weights=Weights("ILSVRC_ResNet34_Double_S48U1_26.67err.pth", "12pN0JobnfgKKFX0MFNmFJ22BHTojpwIM"),
    ),
    PaperRow(
        "ilsvrc",
        "MobileNetV2-Shared",
        "MobileNetV2_Shared",
        (),
        "3.24M",
        "0.66G",
        "27.61%",
        "9.34%",
        weights=Weights("ILSVRC_MobileNetV2_Shared_27.61err.pth", "1EWYOVj0URjc7j93ciYaRONorlPU2v4DX"),
    ),
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


def params_as_printed(params: int, printed: str) -> str:
    """``params`` at the precision of a table's ``printed`` figure (``"0.15M"``, ``"19.3M"``)."""
    return f"{params / 1e6:.{len(printed.rstrip('M').split('.')[1])}f}M"


def row_flags(row: PaperRow) -> str:
    """The flags that build a row's model: ``--model=ResNet32_SingleShared --shared_rank=8 --unique_rank=1``."""
    return f"--model={row.model} {rank_flags(dict(row.ranks))}".strip()


def paper_table(rows: tuple = PAPER_ROWS) -> list[dict]:
    """Every row of a README table with what this code measures (at the README's precision and convention), flags."""
    table = []
    for r in rows:
        s = summarize(r.model, r.dataset, r.flops_per_mac, **dict(r.ranks))
        params = params_as_printed(s["params"], r.params)
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
                "flags": row_flags(r),
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


def published_row(dataset: str, name: str, ranks: dict | None = None) -> PaperRow:
    """The row whose published checkpoint is ``name`` at ``ranks`` (ranks may be left out where ``name`` has one
    row; ranks the model does not take are ignored). ValueError, one line listing the dataset's published rows."""
    rows = [r for r in PAPER_ROWS if r.dataset == dataset and r.weights is not None]
    given = ranks or {}
    fits = [r for r in rows if r.model == name and all(dict(r.ranks).get(k, v) == v for k, v in given.items())]
    if len(fits) == 1:
        return fits[0]
    asked = f"--model={name} {rank_flags(given)}".strip()
    why = "has several published checkpoints: give the rank flags" if fits else "has no published checkpoint"
    listing = ", ".join(f"{r.row} ({row_flags(r)})" for r in rows)
    raise ValueError(f"{asked} on {dataset} {why}; the published {dataset} rows are {listing}")


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
