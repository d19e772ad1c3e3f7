"""Inference folding (performance issue): a shared-basis model becomes a plain-speed model with the same outputs.

In eval mode a factorised conv is linear (one dense conv with a bias), and a BatchNorm after a conv is the conv with
scaled filters and a bias; exact up to float rounding (~1e-7 relative). Protocol: a module opts in with ``folded()``
(an eval-only equivalent, built without modifying it); :func:`fold` replaces the outermost such modules, then calls
``after_fold()`` where a module defines it (work across blocks: DenseNet's bias moves, MobileNetV2's stem and head).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def foldable(model: nn.Module) -> bool:
    """Whether :func:`fold` changes anything: some block below the root has a ``folded()`` form (plain ResNets and
    the later whole-conv-sharing models have none)."""
    return any(callable(getattr(m, "folded", None)) for m in model.modules() if m is not model)


def fold(model: nn.Module) -> nn.Module:
    """An inference-only copy of ``model`` (eval mode, BN statistics frozen into the weights) with every foldable
    block replaced by its folded form; ``model`` (which must be in eval mode) is not modified."""
    if model.training:
        raise ValueError("fold() freezes BatchNorm statistics: call model.eval() first (folding is for inference)")
    model = copy.deepcopy(model)
    if getattr(model, "folded", None) is True:  # already folded: folding again would find no BatchNorms to fold
        return model
    with torch.random.fork_rng(devices=[]):  # building the folded modules runs their default init: keep the RNG
        _replace(model)
        for module in list(model.modules()):
            if callable(getattr(module, "after_fold", None)):
                module.after_fold()
    _drop_unused_bases(model)
    model.eval()
    model.folded = True
    return model


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if callable(getattr(child, "folded", None)):
            setattr(module, name, child.folded())
        else:
            _replace(child)


def _drop_unused_bases(model: nn.Module) -> None:
    # A root ``shared_basis*`` no block holds is dead (DenseNet's uncalled 4th too); a bare SharedBasisConv2d keeps it.
    if callable(getattr(model, "basis_positions", None)):
        return
    for name in [n for n in model._modules if n.startswith("shared_basis")]:
        target = model._modules[name]
        if sum(1 for m in model.modules(remove_duplicate=False) if m is target) == 1:
            delattr(model, name)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = scale * x + shift`` per channel, in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.detach(), shift.detach()


@torch.no_grad()
def conv_with_bias(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A new conv with ``conv``'s geometry (kernel, stride, padding, groups...) and the given weight and bias."""
    new = nn.Conv2d(
        weight.shape[1] * conv.groups,
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The conv equal, in eval mode, to ``bn(conv(x))``: filters scaled per output channel, plus a bias."""
    scale, shift = bn_affine(bn)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv_with_bias(conv, conv.weight * scale.view(-1, 1, 1, 1), bias)


def _basis_weight(position) -> torch.Tensor:
    parts = [m.weight for m in (position.unique, position.shared) if m is not None]
    return torch.cat(parts) if len(parts) > 1 else parts[0]  # (r, in, kh, kw), unique rows first


def dense_is_cheaper(position) -> bool:
    """Whether one dense conv (``in*kh*kw*out`` MACs per pixel) costs no more than the factorised one (``r*(in*kh*kw +
    out)``); low ranks make it more work (2.9x for CIFAR-100 ResNet34-S8U1, that much slower on CPU too)."""
    r, cin, kh, kw = _basis_weight(position).shape
    out = position.coeff.out_channels
    return cin * kh * kw * out <= r * (cin * kh * kw + out)


@torch.no_grad()
def fold_factorised(position, dense: bool | None = None, keep_bias: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """``(module, bias)``: a factorised conv (ungrouped bases) without its basis BN, in eval mode, as one dense conv
    (``dense=None``: if :func:`dense_is_cheaper`) or basis + 1x1 conv; ``bias`` on its last conv if ``keep_bias``."""
    scale, shift = bn_affine(position.basis_bn)
    # coeff(basis_bn(B x)) = coeff'(B x) + bias: coeff' (out, r, 1, 1) is the coefficients times the BN scale, bias
    # (out,) the coefficients applied to the BN shift; B is the [unique || shared] weight (r, in, kh, kw).
    coeff = position.coeff.weight * scale.view(1, -1, 1, 1)
    bias = position.coeff.weight.flatten(1) @ shift
    basis = _basis_weight(position)
    template = position.unique if position.unique is not None else position.shared  # 3x3 geometry of the basis
    if dense_is_cheaper(position) if dense is None else dense:
        weight = torch.einsum("or,rikl->oikl", coeff.flatten(1), basis)  # (out, in, kh, kw)
        return conv_with_bias(template, weight, bias if keep_bias else None), bias
    return nn.Sequential(
        conv_with_bias(template, basis, None), conv_with_bias(position.coeff, coeff, bias if keep_bias else None)
    ), bias
