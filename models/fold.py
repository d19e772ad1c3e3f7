"""Inference folding (performance issue): a shared-basis model becomes a plain-speed model with the same outputs.

In eval mode basis conv, basis BN and coefficient conv are all linear, so a factorised conv is one dense conv with a
bias, and a BatchNorm after a conv is the conv with scaled filters and a bias. What each family folds to:

* **ResNets**: where one dense 3x3 conv is no more work than the factorised one (CIFAR-10), each factorised conv
  becomes a dense conv whose bias folds into the BN that follows (``bn(y + b) = bn'(y)`` with running mean
  ``mu - b``), so a folded shared ResNet *is* a plain ResNet: same block class, same parameter shapes, same speed.
  Where the rank is low against the width (CIFAR-100/ILSVRC ResNet34) it stays a basis conv + 1x1 conv, without the
  basis BN and the concatenation, inside the same plain block class.
* **DenseNet**: each shared layer's basis part becomes one dense 3x3 conv (a plain ``Bottleneck``) when that costs
  fewer MACs (S64U4), else it stays factorised without its BN (S16U1: the dense conv would be 26% more MACs); the
  new channels' bias is moved into the BatchNorms that read them, so the folded S64U4 has exactly the plain
  DenseNet's state_dict (see :meth:`models.densenet.SharedBottleneck.folded` and ``DenseNet.after_fold``).
* **MobileNetV2**: every conv -> BN pair becomes one conv with bias (blocks, plain ones too, stem and head); a block
  that called its stage's shared 1x1 expansion gets its own 1x1 conv (the shared conv times that block's ``bn1``).
* **ResNeXt**: in shared blocks a ReLU sits between the basis BN and ``conv3``, so the BNs fold only into the convs
  before them; the grouped bases stay two grouped convs (see :meth:`models.resnext.SharedBottleneck.folded`).

Folding is exact up to float rounding (about 1e-7 relative on the logits). It pays only where the folded form is
not more work: :func:`dense_is_cheaper` is the test the DenseNet layers use. (The ResNets fold to dense convs at any
rank would make CIFAR-100/ILSVRC ResNet34 *more* MACs, so they use the same test.)

Protocol: a module opts in by defining ``folded() -> nn.Module`` (an eval-only equivalent of itself, built without
modifying it); :func:`fold` replaces the outermost such modules. A module may also define ``after_fold()``, called on
the folded copy once every block is replaced, for work that spans blocks (DenseNet's bias moves, MobileNetV2's stem
and head). Network-level shared bases (``shared_basis*``) that no module uses any more are then dropped.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn


def fold(model: nn.Module) -> nn.Module:
    """Return an inference-only copy of ``model`` with every foldable block replaced by its folded form.

    The input model is not modified. The copy is in eval mode; BatchNorm statistics are frozen into the weights, so
    training it would not reproduce training the original.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold() freezes BatchNorm statistics: call model.eval() first (folding is for inference)")
    if getattr(model, "folded", None) is True:  # already folded: folding again would find no BatchNorms to fold
        return copy.deepcopy(model)
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):  # building the folded modules runs their default init: keep the RNG
        _replace(model)
        for module in list(model.modules()):
            hook = getattr(module, "after_fold", None)
            if callable(hook):
                hook()
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
    # The network-level registrations of shared bases (``shared_basis*`` on the root, where every family keeps them)
    # are dead once no block holds the basis any more: drop them from the copy. A basis still held by an unfolded
    # block is registered there too and stays; so does the basis of a root that uses it itself (a bare
    # SharedBasisConv2d). This also drops bases that were never called (DenseNet's shared_basis_4).
    if callable(getattr(model, "basis_positions", None)):
        return
    for name in [n for n in model._modules if n.startswith("shared_basis")]:
        target = model._modules[name]
        holders = sum(1 for m in model.modules(remove_duplicate=False) if m is target)
        if holders == 1:
            delattr(model, name)


# ------------------------------------------------------------------------------------------------- fold helpers


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) = scale * x + shift`` per channel, in eval mode."""
    if bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.detach(), shift.detach()


@torch.no_grad()
def conv_with_bias(conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Conv2d:
    """A new ``nn.Conv2d`` with ``conv``'s geometry (kernel, stride, padding, groups...) and the given weight and bias;
    the channel counts are the weight's (``out = weight.shape[0]``, ``in = weight.shape[1] * groups``)."""
    new = nn.Conv2d(weight.shape[1] * conv.groups, weight.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=bias is not None,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
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
    """Whether one dense conv costs no more MACs than the factorised conv of a ``BasisPosition``.

    Per output position: dense ``in*kh*kw*out`` against low rank ``r*(in*kh*kw + out)`` (basis conv + coefficient
    conv). A low rank (``r`` below about ``out``) makes the dense conv *more* work, e.g. 2.9x for CIFAR-100
    ResNet34-S8U1, and on CPU it is that much slower too; then keep the factorisation (:func:`fold_position_low_rank`).
    """
    r, cin, kh, kw = _basis_weight(position).shape
    out = position.coeff.out_channels
    return cin * kh * kw * out <= r * (cin * kh * kw + out)


@torch.no_grad()
def fold_position_low_rank(position) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factorised conv of a ``BasisPosition`` without its basis BN, in eval mode.

    Returns ``(basis, coeff, bias)``: ``coeff(basis_bn(B x)) = coeff'(B x) + bias`` with ``B`` the ``[unique ||
    shared]`` basis weight ``(r, in, kh, kw)`` (one tensor, so one conv) and ``coeff'`` ``(out, r, 1, 1)`` the
    coefficients times the BN scale; ``bias`` (out,) is the coefficients applied to the BN shift. Ungrouped bases only.
    """
    scale, shift = bn_affine(position.basis_bn)
    coeff = position.coeff.weight
    return _basis_weight(position).clone(), coeff * scale.view(1, -1, 1, 1), coeff.flatten(1) @ shift


@torch.no_grad()
def fold_position(position) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense conv equal, in eval mode, to ``coeff(basis_bn([unique || shared](x)))``.

    Returns ``(weight, bias)``: weight ``(out, in, kh, kw)`` = scaled coefficients x basis filters, bias as in
    :func:`fold_position_low_rank` (which this composes into one conv). Ungrouped bases only.
    """
    basis, coeff, bias = fold_position_low_rank(position)
    return torch.einsum("or,rikl->oikl", coeff.flatten(1), basis), bias


@torch.no_grad()
def fold_factorised(position, dense: Optional[bool] = None, keep_bias: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode replacement of a factorised conv, its basis BN folded away: one dense conv where that is no more
    work (``dense=None``: :func:`dense_is_cheaper`), else basis conv + 1x1 coefficient conv in an ``nn.Sequential``.

    Returns ``(module, bias)``: the output bias per channel, on the module's last conv when ``keep_bias`` (for
    families that move it downstream later), else left to the caller to absorb into the BatchNorm that follows.
    """
    template = position.unique if position.unique is not None else position.shared  # 3x3 geometry of the basis
    if dense_is_cheaper(position) if dense is None else dense:
        weight, bias = fold_position(position)
        return conv_with_bias(template, weight, bias if keep_bias else None), bias
    basis, coeff, bias = fold_position_low_rank(position)
    return nn.Sequential(conv_with_bias(template, basis, None),
                         conv_with_bias(position.coeff, coeff, bias if keep_bias else None)), bias
