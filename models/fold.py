"""Inference folding (performance issue): a shared-basis model becomes a plain-speed model with the same outputs.

In eval mode basis conv, basis BN and coefficient conv are all linear, so a factorised conv is one dense conv with a
bias. For the ResNets the bias then folds into the BN that follows (``bn(y + b) = bn'(y)`` with running mean
``mu - b``), so a folded shared ResNet *is* a plain ResNet: same block class, same parameter shapes, same speed.
Blocks opt in by defining ``folded() -> nn.Module`` (an eval-only equivalent of themselves).
"""
from __future__ import annotations

import copy

import torch.nn as nn


def fold(model: nn.Module) -> nn.Module:
    """Return an inference-only copy of ``model`` with every foldable block replaced by its folded form.

    The input model is not modified. The copy is in eval mode; BatchNorm statistics are frozen into the weights, so
    training it would not reproduce training the original.
    """
    if model.training:
        raise ValueError("fold() freezes BatchNorm statistics: call model.eval() first (folding is for inference)")
    model = copy.deepcopy(model)
    _replace(model)
    model.eval()
    model.folded = True
    return model


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if hasattr(child, "folded") and callable(child.folded):
            setattr(module, name, child.folded())
        else:
            _replace(child)
    # Shared bases registered on the network are no longer used by folded blocks: drop them from the copy.
    for name in [n for n in module._modules if n.startswith("shared_basis")]:
        if not _used_below(module, module._modules[name], skip=name):
            delattr(module, name)


def _used_below(module: nn.Module, target: nn.Module, skip: str) -> bool:
    return any(m is target for n, child in module.named_children() if n != skip for m in child.modules())
