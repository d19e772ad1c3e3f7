"""Inference folding (performance issue): a shared-basis model becomes a plain-speed model with the same outputs.

In eval mode basis conv, basis BN and coefficient conv are all linear, so a factorised conv is one dense conv with a
bias, and a BatchNorm after a conv is the conv with scaled filters and a bias. What each family folds to:

* **ResNets**: the dense conv's bias folds into the BN that follows (``bn(y + b) = bn'(y)`` with running mean
  ``mu - b``), so a folded shared ResNet *is* a plain ResNet: same block class, same parameter shapes, same speed.
* **DenseNet**: each shared bottleneck becomes a plain ``Bottleneck``; the dense 3x3 conv's bias is moved into the
  BatchNorms that read those channels (later bottlenecks, the transition, the final BN), so the folded shared
  DenseNet has exactly the plain DenseNet's state_dict (see :meth:`models.densenet.DenseNet.after_fold`).
* **MobileNetV2**: every conv -> BN pair becomes one conv with bias (blocks, stem and head); a block that called its
  stage's shared 1x1 expansion gets its own 1x1 conv (the shared conv times that block's ``bn1``).
* **ResNeXt**: a ReLU sits between the basis BN and ``conv3``, so only the BNs fold into the convs before them; the
  grouped bases stay two grouped convs (see :meth:`models.resnext.SharedBottleneck.folded`).

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
    model = copy.deepcopy(model)
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


def _drop_unused_bases(module: nn.Module) -> None:
    # Shared bases registered on the network are no longer used by folded blocks: drop them from the copy. This also
    # drops bases that were never called (DenseNet's shared_basis_4), since no block aliases them.
    for child in module.children():
        _drop_unused_bases(child)
    for name in [n for n in module._modules if n.startswith("shared_basis")]:
        if not _used_below(module, module._modules[name], skip=name):
            delattr(module, name)


def _used_below(module: nn.Module, target: nn.Module, skip: str) -> bool:
    return any(m is target for n, child in module.named_children() if n != skip for m in child.modules())


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
    """A new ``nn.Conv2d`` with ``conv``'s geometry (stride, padding, groups...) and the given weight and bias."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=bias is not None, padding_mode=conv.padding_mode,
                    device=weight.device, dtype=weight.dtype)
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
