"""Shared filter bases (paper section 3; SPEC section 1).

A 3x3 convolution of a residual block is factorised into

    [unique basis conv || shared basis conv]  ->  basis BatchNorm  ->  1x1 coefficient conv

where the shared basis is one ``nn.Conv2d`` owned by the network and used by every block of a group, and the unique
basis is the block's own. Unique channels come first: the coefficient conv's input channels are ordered that way in
the authors' checkpoints.

Two decisions shape this module:

* **Flat keys.** The authors' checkpoints store the parts of a factorised conv as flat attributes of the *block*
  (``layer1.1.basis_conv1``, ``layer1.1.basis_bn1``, ``layer1.1.coeff_conv1``). A nested module would give nested keys
  and need key remapping on every save and load, which also breaks ``DataParallel`` replicas if done with unregistered
  references. So the blocks of the checkpoint-compatible models own the parts under their checkpoint names and call
  :func:`basis_conv2d` for the fused convolution; :class:`SharedBasisConv2d` packages the same parts as one module for
  new architectures and notebooks. Both describe themselves to :func:`models.fold` and the FLOP counter through
  :class:`BasisPosition`.
* **Shared parameters.** The shared ``nn.Conv2d`` is registered on the network *and* on every block that uses it (like
  nanoGPT's tied embedding): ``parameters()`` yields it once, so optimisers and parameter counts see one tensor, while
  ``state_dict()`` lists it under every alias key, exactly as the reference checkpoints do. Every family registers
  the aliases with :func:`share_bases`, so :func:`basis_groups` finds the groups of all of them in one way.

Every family takes its variant as one :class:`BasisCfg` (``None`` = the plain model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BasisCfg:
    """How a family shares filter bases: the one variant vocabulary of every family (``basis=None`` = plain model).

    Args:
        bases_per_group: shared bases per group: 2 (one per conv position, ``DoubleShared``; CIFAR-10 ``SharedOnly``),
            1 (used by every shared layer of the group) or 0 (``NonShared``: unique filters only).
        shared_rank: filters per shared basis in group 1 (families scale it per group as the authors do); 0 where the
            architecture fixes the basis size (MobileNetV2's shared expansion convs).
        unique_rank: filters of each layer's own basis in group 1 (0 = none: ``SharedOnly``, MobileNetV2).
    """

    bases_per_group: int = 1
    shared_rank: int = 0
    unique_rank: int = 0

    def require(self, family: str, bases_per_group: int = 1, fixed_size: bool = False) -> None:
        """Refuse a config ``family`` cannot build (the registry makes only valid ones; this guards direct use)."""
        if self.bases_per_group != bases_per_group or (fixed_size and (self.shared_rank or self.unique_rank)):
            sizes = " and no ranks (the architecture fixes its size)" if fixed_size else ""
            raise ValueError(f"{family} shares {bases_per_group} basis per group{sizes}, not {self}")


def register_bases(module: nn.Module, bases: Sequence[nn.Conv2d], name: str) -> tuple:
    """Register ``bases`` on ``module`` under their checkpoint keys: one basis as ``name``, several as ``name_1``,
    ``name_2``...; returns the keys."""
    names = (name,) if len(bases) == 1 else tuple(f"{name}_{j}" for j in range(1, len(bases) + 1))
    for key, basis in zip(names, bases):
        setattr(module, key, basis)
    return names


def share_bases(block: nn.Module, bases: Sequence[nn.Conv2d], name: str = "shared_basis") -> None:
    """Register a group's shared bases on the ``block`` that uses them (alias registration, :func:`register_bases`)
    and record them for :func:`shared_bases_of`. The module stays one tensor (``parameters()`` yields it once) while
    ``state_dict()`` lists it under the block too, as the authors' files do; call it where the keys must come."""
    block.shared_basis_names = register_bases(block, bases, name)


def shared_bases_of(block: nn.Module) -> list[nn.Conv2d]:
    """The shared bases registered on ``block`` by :func:`share_bases`, in order (``[]`` for other modules)."""
    return [getattr(block, key) for key in getattr(block, "shared_basis_names", ())]


def basis_conv2d(x: torch.Tensor, unique: Optional[nn.Conv2d], shared: Optional[nn.Conv2d], *,
                 stride: int = 1, padding: int = 1, fused: bool = True) -> torch.Tensor:
    """Apply ``[unique || shared]`` basis convolutions to ``x``.

    With ``fused=True`` and both parts present, the two weights are concatenated and applied by a single convolution,
    which gives the same output (and the same weight gradients) as two convolutions followed by ``torch.cat``, in
    fewer and larger kernels. ``fused=False`` keeps the authors' two-conv form (used by the FLOP counter, which hooks
    the individual modules, and by the benchmark's straightforward path).
    """
    if fused and unique is not None and shared is not None and unique.groups == shared.groups == 1:
        # (u + s, C_in, kh, kw): unique filters first, as the coefficient conv expects.
        weight = torch.cat((unique.weight, shared.weight), dim=0)
        return F.conv2d(x, weight, None, stride, padding)
    parts = [_conv(m, x, stride) for m in (unique, shared) if m is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _conv(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    # Call the module where its own stride applies, so forward hooks (the FLOP counter) see the call.
    if conv.stride == (stride, stride):
        return conv(x)
    return F.conv2d(x, conv.weight, conv.bias, stride, conv.padding, conv.dilation, conv.groups)


class BasisPosition(NamedTuple):
    """The parts of one factorised conv, as found in a block (used by folding, FLOP counting and tests)."""

    unique: Optional[nn.Conv2d]
    shared: Optional[nn.Conv2d]
    basis_bn: nn.BatchNorm2d
    coeff: nn.Conv2d


def make_shared_basis(in_channels: int, rank: int, kernel_size: int = 3, groups: int = 1) -> nn.Conv2d:
    """A shared basis: ``rank`` filters over ``in_channels``, stride 1, 'same' padding, no bias."""
    return nn.Conv2d(in_channels, rank, kernel_size, stride=1, padding=kernel_size // 2, groups=groups, bias=False)


@torch.no_grad()
def init_orthogonal_(weights: Sequence[torch.Tensor]) -> None:
    """Draw one orthogonal matrix with the rows of all ``weights`` and split it between them (one weight: the same
    draws as ``nn.init.orthogonal_`` on it)."""
    rows = [w.shape[0] for w in weights]
    joint = torch.empty(sum(rows), *weights[0].shape[1:])
    nn.init.orthogonal_(joint)
    for w, part in zip(weights, joint.split(rows)):
        w.copy_(part)


@dataclass
class BasisGroup:
    """The basis weights of one group: shared bases (in row order) and unique basis weights (block order)."""

    shared: list = field(default_factory=list)
    unique: list = field(default_factory=list)


def _unique_bases(block: nn.Module) -> list[nn.Conv2d]:
    # Linear factorised convs describe themselves by basis_positions(); a block whose basis part is not linear
    # (ResNeXt) names its own basis convs with unique_bases().
    if callable(getattr(block, "unique_bases", None)):
        return block.unique_bases()
    positions = block.basis_positions() if callable(getattr(block, "basis_positions", None)) else []
    return [p.unique for p in positions if p.unique is not None]


def basis_groups(model: nn.Module) -> list[BasisGroup]:
    """The groups of shared bases of ``model``, for the regulariser and the orthogonal init; one home for all families.

    The network-level bases are the model's own ``shared_basis*`` modules (in registration order; also the ones no
    block calls, like DenseNet's ``shared_basis_4``) and those the blocks hold (:func:`share_bases`). Bases used by
    the same block form one group (DoubleShared's pair); a group's unique weights are the own basis convs of the
    blocks that use it, in module order. Plain and NonShared models have no group.
    """
    bases = {id(m): m for n, m in model.named_children() if n.startswith("shared_basis")}
    users = [(block, shared_bases_of(block)) for block in model.modules() if shared_bases_of(block)]
    leader = {}  # id of a basis -> id of the first basis of its group
    for _, held in users:
        for m in held:
            bases.setdefault(id(m), m)
            leader.setdefault(id(m), id(held[0]))
    groups: dict[int, BasisGroup] = {}
    for key, m in bases.items():
        groups.setdefault(leader.get(key, key), BasisGroup()).shared.append(m.weight)
    for block, held in users:
        groups[leader[id(held[0])]].unique.extend(conv.weight for conv in _unique_bases(block))
    return list(groups.values())


class SharedBasisConv2d(nn.Module):
    """Factorised convolution: ``[unique || shared basis] -> BN -> 1x1 coefficients``.

    Args:
        in_channels: input channels.
        out_channels: output channels of the coefficient conv.
        unique_rank: filters in this layer's own basis (0 = shared part only).
        shared_basis: the shared ``nn.Conv2d`` to use (``None`` = unique part only). It is registered here too, so
            its weight is one tensor that receives gradient from every layer using it.
        stride: stride of the basis convolution (the shared module itself is stride 1; the stride is applied here).
        fused: compute both bases with one convolution (exact; see :func:`basis_conv2d`).
    """

    def __init__(self, in_channels: int, out_channels: int, unique_rank: int,
                 shared_basis: Optional[nn.Conv2d] = None, *, stride: int = 1, fused: bool = True) -> None:
        super().__init__()
        shared_rank = shared_basis.out_channels if shared_basis is not None else 0
        if unique_rank + shared_rank <= 0:
            raise ValueError("SharedBasisConv2d needs unique_rank > 0 or a shared basis")
        if shared_basis is not None and shared_basis.in_channels != in_channels:
            raise ValueError(f"shared basis takes {shared_basis.in_channels} input channels, not {in_channels}")
        self.stride = stride
        self.fused = fused
        if shared_basis is not None:
            share_bases(self, [shared_basis])
        else:
            self.shared_basis = None
        self.basis_conv = (nn.Conv2d(in_channels, unique_rank, 3, stride=stride, padding=1, bias=False)
                           if unique_rank > 0 else None)
        self.basis_bn = nn.BatchNorm2d(unique_rank + shared_rank)
        self.coeff_conv = nn.Conv2d(unique_rank + shared_rank, out_channels, 1, bias=False)

    def basis_positions(self) -> list[BasisPosition]:
        return [BasisPosition(self.basis_conv, self.shared_basis, self.basis_bn, self.coeff_conv)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = basis_conv2d(x, self.basis_conv, self.shared_basis, stride=self.stride, fused=self.fused)
        return self.coeff_conv(self.basis_bn(x))


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """Switch every factorised conv of ``model`` between the fused and the two-conv form (same function)."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused
    return model

