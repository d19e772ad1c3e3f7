"""A trained plain ResNet -> its shared-basis counterpart, by SVD, as a start for fine-tuning (issue 28).

The paper trains shared models from scratch; this is the other road. For every group of factorised convs, grouped as
the shared model shares them (DoubleShared: per basis position; SingleShared/SharedOnly: both positions together), the
blocks' plain 3x3 kernels are stacked as rows (filters flattened over in x kh x kw). The shared basis is the stack's top
right singular vectors (orthonormal rows); each block's unique filters are the top right singular vectors of its kernel
outside the shared subspace; its coefficients are its kernel projected on ``[unique; shared]``. Every other tensor is
copied. The basis BatchNorm is the identity in eval mode: running mean 0, var 1 and weight sqrt(1 + eps), or, with
calibration images, the basis outputs' statistics with weight sqrt(var + eps) and bias mean (also close to the
identity in train mode, which is what fine-tuning sees). When the shared and unique ranks cover the rank of each stack
the converted model computes exactly the plain model's function.

A truncated factorisation changes what every later BN sees (at S16, 0.35-0.8x the plain variance, compounding with
depth) while they keep the plain running statistics, so in eval mode the activations drift and accuracy falls towards
chance. Calibration therefore first corrects, in forward order, every BN after the first factorised conv: it keeps
the plain statistics and applies the shift measured on the calibration images (the normalised input gets the plain
model's per-channel mean and variance there). An exact conversion measures no shift and stays exact; re-estimating
from the images alone would replace the plain statistics and lose that.

``python -m models.convert --from PLAIN.pth --model ResNet56_DoubleShared --shared_rank 16 --unique_rank 1 --out
shared.pth`` writes this project's checkpoint format (``train_<dataset>.py --pretrained`` fine-tunes it,
``eval_<dataset>.py`` evaluates it). The library part imports nothing from ``utils``; only the command line's
``--calibrate`` reads images through ``utils.data``, as training reads them.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from .atomic import atomic_write_bytes
from .pretrained import (
    FORMAT_VERSION,
    _layout,
    _shape_mismatch,
    _SkipInit,
    guess_fit,
    head_classes,
    read_checkpoint,
    state_dict_of,
)
from .registry import DATASETS, canonical_name, datasets_of, get_model, rank_flags, unknown_model
from .regularizer import OrthogonalityRegularizer
from .summary import count_macs, count_params

# (dataset, plain model) -> the shared models it converts into (the issue's list; NonShared shares nothing).
CONVERSIONS = {
    ("cifar10", "ResNet32"): ("ResNet32_DoubleShared", "ResNet32_SingleShared", "ResNet32_SharedOnly"),
    ("cifar10", "ResNet56"): ("ResNet56_DoubleShared", "ResNet56_SingleShared", "ResNet56_SharedOnly"),
    ("cifar100", "ResNet34"): ("ResNet34_SingleShared", "ResNet34_SharedOnly"),
    ("ilsvrc", "ResNet34"): ("ResNet34_SingleShared", "ResNet34_DoubleShared"),
}
REPORT_IMAGES = 16  # random inputs the logit check uses when no calibration images are given


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the message says what to do."""


def _conversions_line() -> str:
    return "; ".join(f"{d} {plain} -> {', '.join(targets)}" for (d, plain), targets in CONVERSIONS.items())


def plain_counterpart(target: str, dataset: str) -> str:
    """The plain model whose checkpoints convert into ``target`` on ``dataset``."""
    for (d, plain), targets in CONVERSIONS.items():
        if d == dataset and target in targets:
            return plain
    raise ConversionError(f"{target} ({dataset}) is not a conversion target; conversions: {_conversions_line()}")


# ----------------------------------------------------------------------------------------------------------------------
# The factorisation


def _unique_rows(kernel: torch.Tensor, complement: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` right singular vectors of ``kernel`` outside the shared subspace (``complement``: orthonormal
    rows spanning the rest); zero rows where the shared basis already spans everything."""
    rows = kernel.new_zeros(rank, kernel.shape[1])
    if rank == 0 or complement.shape[0] == 0:
        return rows
    residual = kernel @ complement.t()  # in the complement's coordinates
    _, _, vh = torch.linalg.svd(residual, full_matrices=rank > min(residual.shape))
    found = vh[:rank] @ complement
    rows[: found.shape[0]] = found
    return rows


def _identity_bn_(bn: nn.BatchNorm2d, mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> None:
    """``bn`` as the identity in eval mode, whose running statistics are ``mean``/``var`` (default 0/1)."""
    mean = torch.zeros_like(bn.running_mean) if mean is None else mean
    var = torch.ones_like(bn.running_var) if var is None else var
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(torch.sqrt(var + bn.eps))
    bn.bias.copy_(mean)
    bn.num_batches_tracked.zero_()


def factorised_positions(model: nn.Module) -> list[list[tuple[str, object]]]:
    """The factorised convs of a shared ResNet as ``(plain conv name, BasisPosition)``, one list per shared basis (the
    positions that share it), in module order."""
    groups: dict[int, list] = {}
    for name, block in model.named_modules():
        if callable(getattr(block, "basis_positions", None)) and block is not model:
            for i, position in enumerate(block.basis_positions(), 1):
                if position.shared is None:
                    raise ConversionError(f"{name} has no shared basis to convert into")
                groups.setdefault(id(position.shared), []).append((f"{name}.conv{i}", position))
    return list(groups.values())


@torch.no_grad()
def factorise_(plain_state: dict, target: nn.Module) -> list[tuple[str, float]]:
    """Write the SVD factorisation of ``plain_state``'s 3x3 kernels into ``target``'s factorised convs (computed in
    float64); returns each position's relative Frobenius error ``|W - C B| / |W|``."""
    errors = []
    for members in factorised_positions(target):
        kernels = [plain_state[f"{name}.weight"].double().flatten(1) for name, _ in members]
        _, _, vh = torch.linalg.svd(torch.cat(kernels), full_matrices=True)  # rows: right singular vectors
        shared = members[0][1].shared
        shared_rows, complement = vh[: shared.out_channels], vh[shared.out_channels :]
        shared.weight.copy_(shared_rows.view_as(shared.weight))
        for (name, position), kernel in zip(members, kernels):
            unique = position.unique
            unique_rows = _unique_rows(kernel, complement, unique.out_channels if unique is not None else 0)
            if unique is not None:
                unique.weight.copy_(unique_rows.view_as(unique.weight))
            basis = torch.cat([unique_rows, shared_rows])  # unique rows first, as the model concatenates them
            coeff = kernel @ basis.t()  # the projection: the basis rows are orthonormal (or zero)
            position.coeff.weight.copy_(coeff.view_as(position.coeff.weight))
            _identity_bn_(position.basis_bn)
            errors.append((name, float((kernel - coeff @ basis).norm() / kernel.norm().clamp_min(1e-300))))
    return errors


def _batch_statistics(x: torch.Tensor, sums: list) -> None:
    x = x.double().transpose(0, 1).flatten(1)  # (channels, N*H*W)
    sums[0] += x.shape[1]
    sums[1] = sums[1] + x.sum(1)
    sums[2] = sums[2] + x.square().sum(1)


def _mean_var(sums: list) -> tuple[torch.Tensor, torch.Tensor]:
    mean = sums[1] / sums[0]
    return mean, (sums[2] / sums[0] - mean.square()).clamp_min(0)


@torch.no_grad()
def calibrate_basis_bn_(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set each basis BN to the statistics of its inputs over ``batches`` (eval mode, where every basis BN is the
    identity, so the statistics do not depend on the order of calibration); returns the number of images."""
    bns = [p.basis_bn for members in factorised_positions(model) for _, p in members]
    sums = {bn: [0, 0.0, 0.0] for bn in bns}

    def record(bn, inputs):
        _batch_statistics(inputs[0], sums[bn])

    hooks = [bn.register_forward_pre_hook(record) for bn in bns]
    was_training, images = model.training, 0
    dtype = next(model.parameters()).dtype
    try:
        model.eval()
        for x in batches:
            model(x.to(dtype))
            images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if images == 0:
        raise ConversionError("no calibration images were read")
    for bn, acc in sums.items():
        mean, var = _mean_var(acc)
        _identity_bn_(bn, mean.to(bn.running_mean.dtype), var.to(bn.running_mean.dtype))
    return images


class _Reached(Exception):
    """Raised by a hook to end a forward pass at the layer it measures."""


def _bns_after_factorised_convs(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorms (not the basis BNs) that run after the first factorised conv, in the order a forward pass meets
    them: every one whose input the factorisation changes."""
    basis = {p.basis_bn for members in factorised_positions(model) for _, p in members}
    names = {m: n for n, m in model.named_modules()}
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(m)) for m in names if isinstance(m, nn.BatchNorm2d)]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *model.cfg.input_size, dtype=next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    first = next(i for i, m in enumerate(order) if m in basis)
    return [(names[m], m) for m in order[first:] if m not in basis]


@torch.no_grad()
def reestimate_bn_statistics_(plain: nn.Module, target: nn.Module, batches: Sequence[torch.Tensor]) -> int:
    """Correct the running statistics of every BN after a factorised conv for the shift the factorisation causes.

    Each such BN, in forward order (so it sees its predecessors corrected), gets running statistics under which its
    normalised input has, on ``batches`` in eval mode, the per-channel mean and variance that the plain model's has at
    the same BN: the plain statistics are kept and only the converted-vs-plain difference measured on the images is
    applied. An exact conversion sees no difference and keeps the plain model's statistics (and function); replacing
    them by the calibration images' own statistics would not. Returns the number of BNs corrected."""
    if not sum(x.shape[0] for x in batches):
        raise ConversionError("no calibration images were read")
    bns = _bns_after_factorised_convs(target)
    plain_modules = dict(plain.named_modules())
    dtype = next(target.parameters()).dtype
    plain_sums = {name: [0, 0.0, 0.0] for name, _ in bns}

    def record_plain(name):
        return lambda _, inputs: _batch_statistics(inputs[0], plain_sums[name])

    modes = plain.training, target.training
    hooks = [plain_modules[name].register_forward_pre_hook(record_plain(name)) for name, _ in bns]
    try:
        plain.eval(), target.eval()
        for x in batches:
            plain(x.to(dtype))
        for name, bn in bns:
            sums = [0, 0.0, 0.0]

            def record(_, inputs, sums=sums):
                _batch_statistics(inputs[0], sums)
                raise _Reached

            hook = bn.register_forward_pre_hook(record)
            try:
                for x in batches:
                    try:
                        target(x.to(dtype))
                    except _Reached:
                        pass
            finally:
                hook.remove()
            _match_normalised_moments_(bn, plain_modules[name], _mean_var(plain_sums[name]), _mean_var(sums))
    finally:
        for h in hooks:
            h.remove()
        plain.train(modes[0]), target.train(modes[1])
    return len(bns)


def _match_normalised_moments_(bn: nn.BatchNorm2d, plain_bn: nn.BatchNorm2d, seen_plain, seen_here) -> None:
    """Running statistics for ``bn`` such that ``(x - mean) / sqrt(var + eps)`` has the same mean and variance over
    its input ``x`` (moments ``seen_here``) as the plain BN's over its own input (``seen_plain``); a channel the plain
    model never varies keeps the plain statistics."""
    plain_mean, plain_var = plain_bn.running_mean.double(), plain_bn.running_var.double()
    (mean_p, var_p), (mean_c, var_c) = seen_plain, seen_here
    ratio = torch.where(var_p > 0, var_c / var_p.where(var_p > 0, 1.0), 1.0)  # variance here / variance in the plain
    mean = mean_c - (mean_p - plain_mean) * ratio.sqrt()
    var = ((plain_var + bn.eps) * ratio - bn.eps).clamp_min(0)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)


@torch.no_grad()
def _compare_logits(plain: nn.Module, target: nn.Module, batches: Sequence[torch.Tensor]) -> dict:
    """Eval-mode logits of both models on ``batches``: max abs difference, relative Frobenius error, top-1 agreement."""
    modes = plain.training, target.training
    plain.eval(), target.eval()
    try:
        dtype = next(target.parameters()).dtype
        pairs = [(plain(x.to(dtype)), target(x.to(dtype))) for x in batches]
    finally:
        plain.train(modes[0]), target.train(modes[1])
    a, b = torch.cat([p for p, _ in pairs]).double(), torch.cat([t for _, t in pairs]).double()
    return {
        "images": a.shape[0],
        "logit_max_abs_diff": float((a - b).abs().max()),
        "logit_rel_error": float((a - b).norm() / a.norm().clamp_min(1e-300)),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean() * 100),
    }


@torch.no_grad()
def convert(
    plain: nn.Module,
    target: nn.Module,
    images: Sequence[torch.Tensor] | None = None,
    *,
    calibrate: bool = False,
    reestimate: bool = True,
) -> dict:
    """Write ``plain``'s weights, factorised, into ``target`` (both built by :func:`~models.get_model`) and return the
    report (plain data). ``images``: batches for the logit check (random inputs when None) and, with ``calibrate``,
    for the statistics of the BNs after the factorised convs (:func:`reestimate_bn_statistics_`, unless
    ``reestimate`` is False) and then of the basis BNs, which see the corrected network."""
    plain_state = plain.state_dict()
    written = set()
    for key, tensor in target.state_dict().items():
        if key in plain_state:
            if plain_state[key].shape != tensor.shape:
                raise ConversionError(f"{key!r} has shape {tuple(plain_state[key].shape)}, {tuple(tensor.shape)} here")
            tensor.copy_(plain_state[key])
            written.add(key)
    errors = factorise_(plain_state, target)
    factorised = {id(t) for members in factorised_positions(target) for _, p in members for m in p for t in _tensors(m)}
    unset = [k for k, t in target.state_dict(keep_vars=True).items() if k not in written and id(t) not in factorised]
    if unset:
        raise RuntimeError(f"conversion left {len(unset)} tensors of {target.cfg.name} unset, e.g. {unset[0]!r}")
    if calibrate and images is None:
        raise ConversionError("calibration needs images")
    corrected = reestimate_bn_statistics_(plain, target, images) if calibrate and reestimate else 0
    calibrated = calibrate_basis_bn_(target, images) if calibrate else 0
    random_inputs = images is None
    if random_inputs:
        gen = torch.Generator().manual_seed(0)
        images = [torch.randn(REPORT_IMAGES, *target.cfg.input_size, generator=gen)]
    regularizer = OrthogonalityRegularizer(target)
    return {
        "plain": plain.cfg.name,
        "model": target.cfg.name,
        "dataset": target.cfg.dataset,
        "ranks": dict(target.cfg.build_kwargs()),
        "position_rel_error": [[name, err] for name, err in errors],
        "basis_bn": f"calibrated on {calibrated} images" if calibrate else "identity (running mean 0, var 1)",
        "bn_reestimated": corrected,
        "logits_on": "calibration" if calibrate else ("random-input" if random_inputs else "given"),
        **_compare_logits(plain, target, images),
        "params_before": count_params(plain),
        "params_after": count_params(target),
        "flops_before": 2 * count_macs(plain),
        "flops_after": 2 * count_macs(target),
        "regularizer_at_start": float(regularizer()) if regularizer else 0.0,
    }


def _tensors(module: nn.Module | None) -> list[torch.Tensor]:
    return [] if module is None else [*module.parameters(), *module.buffers()]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint files


def _torchvision_keys(state: dict) -> dict | None:
    """A torchvision ResNet state_dict's keys in this project's ILSVRC ResNet's names, or None if it is not one."""
    if not any(".downsample." in k for k in state):
        return None
    return {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}


def _target_datasets(target: str) -> list[str]:
    return [d for d in datasets_of(target) if any(target in t for (ds, _), t in CONVERSIONS.items() if ds == d)]


def load_plain(
    path: str,
    target: str,
    dataset: str | None = None,
    *,
    shared_rank: int | None = None,
    unique_rank: int | None = None,
) -> tuple[nn.Module, nn.Module, str]:
    """``(plain model with the file's weights, target model to fill, source kind)``: the file (this project's, the
    authors' or torchvision's resnet34 state_dict) and the target are checked, every refusal one line."""
    target = canonical_name(target)
    if not datasets_of(target):
        raise ConversionError(unknown_model(target))
    targets = _target_datasets(target)
    if not targets:
        raise ConversionError(f"{target} is not a conversion target; conversions: {_conversions_line()}")
    obj = read_checkpoint(path)
    state = state_dict_of(obj)
    mapped = _torchvision_keys(state)
    kind = "torchvision" if mapped is not None else ("this project's" if obj.get("model") else "the authors'")
    state = state if mapped is None else mapped
    recorded = obj.get("model") if isinstance(obj.get("model"), str) else None
    file_dataset = (
        "ilsvrc" if mapped is not None else (obj.get("dataset") if isinstance(obj.get("dataset"), str) else None)
    )
    if dataset is not None and file_dataset is not None and dataset != file_dataset:
        raise ConversionError(
            f"{path!r} holds a network trained on {file_dataset}, not {dataset}; pass --dataset {file_dataset}"
        )
    dataset = dataset or file_dataset or (targets[0] if len(targets) == 1 else None)
    if dataset is None:
        raise ConversionError(f"{target} exists for {' and '.join(targets)}: pass --dataset (one of them)")
    if dataset not in targets:
        plain_here = recorded or ("ResNet34" if mapped is not None else None)
        fits = CONVERSIONS.get((dataset, plain_here), ())
        hint = f"; a {dataset} {plain_here} converts into {', '.join(fits)}" if fits else ""
        raise ConversionError(f"{target} is a {' and '.join(targets)} model, not {dataset}{hint}")
    plain = plain_counterpart(target, dataset)
    if recorded is not None and recorded != plain:
        raise ConversionError(_wrong_plain(path, recorded, dataset, target))
    heads = head_classes(dataset, state)
    problem = _shape_mismatch(_layout(plain, dataset, heads), state)
    if problem and mapped is not None:
        raise ConversionError(
            f"{path!r} looks like a torchvision state_dict but its keys do not map onto the ILSVRC ResNet34's "
            f"({problem}): only torchvision's resnet34 converts"
        )
    if problem:
        guess = guess_fit(state, dataset)
        if guess is not None and "dataset" not in guess:
            ranks = {k: v for k, v in guess.items() if k != "model"}
            flags = " ".join([f"--model={guess['model']}", rank_flags(ranks)]).strip()
            raise ConversionError(_wrong_plain(path, guess["model"], dataset, target, flags))
        raise ConversionError(f"{path!r} is not a {dataset} {plain} ({problem}); check the file and --dataset")
    try:
        with _SkipInit():  # every tensor is written next
            model = get_model(target, dataset, shared_rank=shared_rank, unique_rank=unique_rank, num_classes=heads)
            source = get_model(plain, dataset, num_classes=heads)
    except ValueError as e:
        raise ConversionError(f"cannot build {target}: {e}") from None
    source.load_state_dict(state, strict=True)
    return source.eval(), model, kind


def _wrong_plain(path: str, held: str, dataset: str, target: str, flags: str | None = None) -> str:
    what = f"{held} ({flags})" if flags else held
    if "_" in held:
        return f"{path!r} holds a {what}, not a plain network: convert the checkpoint of a plain network"
    fits = CONVERSIONS.get((dataset, held))
    if fits is None:
        return f"{path!r} holds a {dataset} {what}, which has no shared counterpart; conversions: {_conversions_line()}"
    return f"{path!r} holds a {dataset} {what}, which converts into {', '.join(fits)}, not {target}: pass one of them"


def converted_checkpoint(model: nn.Module, report: dict, source: str) -> dict:
    """This project's checkpoint of a converted model (no optimizer state; accuracy 0: not measured yet)."""
    cfg = model.cfg
    return {
        "net_state_dict": model.state_dict(),
        "optimizer_state_dict": None,
        "acc": torch.tensor(0.0, dtype=torch.float32),
        "epoch": 0,
        "format_version": FORMAT_VERSION,
        "model": cfg.name,
        "dataset": cfg.dataset,
        "model_kwargs": dict(cfg.build_kwargs()),
        "converted_from": {"path": os.path.abspath(source), **report},
    }


def save_converted(ckpt: dict, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def format_report(r: dict) -> str:
    """The report as printed lines."""
    width = max(len(name) for name, _ in r["position_rel_error"])
    lines = [
        f"converted {r['dataset']} {r['plain']} -> {r['model']} {rank_flags(r['ranks'])}",
        f"  {'position':{width}}  relative Frobenius error",
        *(f"  {name:{width}}  {err:.4f}" for name, err in r["position_rel_error"]),
        f"  basis BN: {r['basis_bn']}; BNs after the factorised convs: "
        + (f"{r['bn_reestimated']} corrected on the same images" if r.get("bn_reestimated") else "plain statistics"),
        f"  logits vs the plain model on {r['images']} {r['logits_on']} images (eval mode): max abs diff "
        f"{r['logit_max_abs_diff']:.3e}, relative error {r['logit_rel_error']:.3e}, top-1 agreement "
        f"{r['top1_agreement']:.2f}%",
        f"  params {r['params_before']:,} -> {r['params_after']:,}; FLOPs (2 x MACs) "
        f"{r['flops_before'] / 1e9:.3f}G -> {r['flops_after'] / 1e9:.3f}G",
        f"  orthogonality regulariser R at start: {r['regularizer_at_start']:.3e}",
    ]
    return "\n".join(lines)


PROG = "python -m models.convert"


def _calibration_batches(dataset: str, root: str | None, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` training images as training reads them (augmented, normalised), in its first epoch's order."""
    from utils.cli import script_facts  # the command line only: the library above imports nothing from utils
    from utils.data import DatasetError, build_loaders

    try:
        loaders = build_loaders(
            dataset,
            root or script_facts("train", dataset, "RECIPE")["dataset_path"],
            min(n, 128),
            num_workers=0,
            seed=seed,
            download=False,
        )
    except DatasetError as e:
        raise ConversionError(str(e)) from None
    loader = loaders.train
    loader.set_epoch(0)
    batches, have = [], 0
    for x, _ in loader:
        batches.append(x[: n - have])
        have += batches[-1].shape[0]
        if have >= n:
            break
    return batches


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="plain checkpoint (this project's, the authors', or torchvision's resnet34 state_dict)",
    )
    p.add_argument("--model", required=True, help="the shared model to convert into, e.g. ResNet56_DoubleShared")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's, or the only one the model has")
    p.add_argument("--shared_rank", type=int, help="default: the model's (16, ILSVRC 32)")
    p.add_argument("--unique_rank", type=int, help="default: the model's (1)")
    p.add_argument("--out", required=True, help="the checkpoint to write (refused if it exists)")
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="correct the BN statistics after the factorised convs and calibrate the basis BN on N training images",
    )
    p.add_argument(
        "--keep_bn_statistics",
        action="store_true",
        help="with --calibrate: calibrate the basis BN only; every other BN keeps the plain statistics (to compare)",
    )
    p.add_argument("--dataset_path", default=None, help="dataset root for --calibrate (default: the training default)")
    p.add_argument("--seed", type=int, default=0, help="order and augmentation of the calibration images")
    args = p.parse_args(argv)
    try:
        if args.calibrate < 0:
            raise ConversionError(f"--calibrate must be 0 or a positive number of images, got {args.calibrate}")
        if args.keep_bn_statistics and not args.calibrate:
            raise ConversionError("--keep_bn_statistics only changes a calibrated conversion: pass --calibrate N too")
        if os.path.exists(args.out):
            raise ConversionError(f"{args.out!r} exists; remove it or pass another --out (nothing was written)")
        plain, target, kind = load_plain(
            args.source, args.model, args.dataset, shared_rank=args.shared_rank, unique_rank=args.unique_rank
        )
        images = None
        if args.calibrate:
            images = _calibration_batches(target.cfg.dataset, args.dataset_path, args.calibrate, args.seed)
        report = convert(plain, target, images, calibrate=bool(args.calibrate), reestimate=not args.keep_bn_statistics)
        report["source"] = kind
        save_converted(converted_checkpoint(target, report, args.source), args.out)
    except (ValueError, OSError) as e:  # CheckpointError and ConversionError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    cfg = target.cfg
    flags = f"--model={cfg.name} {rank_flags(cfg.build_kwargs())}".strip()
    print(f"{format_report(report)}\n  from {args.source} ({kind} format)\nwrote {args.out}")
    print(f"fine-tune: python3 train_{cfg.dataset}.py --pretrained={args.out} {flags} (and the run's other flags)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
