"""Shared filter bases (paper section 3; SPEC section 1).

A factorised 3x3 conv is ``[unique basis conv || shared basis conv] -> basis BN -> 1x1 coefficient conv``; the shared
basis is one ``nn.Conv2d`` used by every block of a group, the unique one is the block's own (unique channels first,
as the coefficient conv's inputs are ordered in the authors' checkpoints). Two decisions shape this module:

* **Flat keys.** The checkpoints store the parts as flat attributes of the *block* (``layer1.1.basis_conv1``,
  ``layer1.1.basis_bn1``, ``layer1.1.coeff_conv1``); a nested module would need key remapping on every save and load.
  So the families' blocks own the parts and call :func:`basis_conv2d`; :class:`SharedBasisConv2d` packages the same
  parts as one module for new architectures. Both describe their parts as :class:`BasisPosition`.
* **Shared parameters.** A shared conv is registered on the network *and* on every block using it (like nanoGPT's
  tied embedding, via :func:`share_bases`): ``parameters()`` yields it once, ``state_dict()`` lists every alias key,
  as the reference checkpoints do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BasisCfg:
    """How a family shares filter bases, the one variant vocabulary of every family (``basis=None``: plain model).

    Args:
        bases_per_group: 2 (one per conv position: ``DoubleShared``, CIFAR-10 ``SharedOnly``), 1 (used by every shared
            layer of the group) or 0 (``NonShared``: unique filters only).
        shared_rank: filters per shared basis in group 1 (families scale it per group as the authors do); 0 where the
            architecture fixes the basis size (MobileNetV2's shared expansion convs).
        unique_rank: filters of each layer's own basis in group 1 (0: none, as in ``SharedOnly`` and MobileNetV2).
    """

    bases_per_group: int = 1
    shared_rank: int = 0
    unique_rank: int = 0

    def require(self, family: str, bases_per_group: int = 1, fixed_size: bool = False) -> None:
        """Refuse a config ``family`` cannot build (the registry makes only valid ones; this guards direct use)."""
        if self.bases_per_group != bases_per_group or (fixed_size and (self.shared_rank or self.unique_rank)):
            sizes = " and no ranks (the architecture fixes its size)" if fixed_size else ""
            raise ValueError(f"{family} shares {bases_per_group} basis per group{sizes}, not {self}")


class BasisPosition(NamedTuple):
    """The parts of one factorised conv, as found in a block (for folding, FLOP counting and tests)."""

    unique: Optional[nn.Conv2d]
    shared: Optional[nn.Conv2d]
    basis_bn: nn.BatchNorm2d
    coeff: nn.Conv2d


def register_bases(module: nn.Module, bases: Sequence[nn.Conv2d], name: str,
                   keys: Optional[Sequence[str]] = None) -> tuple:
    """Register ``bases`` on ``module`` under ``keys``, by default ``name`` for one basis and ``name_1``, ``name_2``...
    for several (the checkpoints' keys); returns the keys."""
    if keys is None:
        keys = (name,) if len(bases) == 1 else [f"{name}_{j}" for j in range(1, len(bases) + 1)]
    for key, basis in zip(keys, bases):
        setattr(module, key, basis)
    return tuple(keys)


def share_bases(block: nn.Module, bases: Sequence[nn.Conv2d], name: str = "shared_basis",
                keys: Optional[Sequence[str]] = None) -> None:
    """Register a group's shared bases as aliases on the ``block`` that uses them (:func:`register_bases`) and record
    them for :func:`shared_bases_of`; call it where the checkpoint's keys of the block must come."""
    block.shared_basis_names = register_bases(block, bases, name, keys)


def shared_bases_of(block: nn.Module) -> list[nn.Conv2d]:
    """The shared bases registered on ``block`` by :func:`share_bases`, in order (``[]`` for other modules)."""
    return [getattr(block, key) for key in getattr(block, "shared_basis_names", ())]


def make_shared_basis(in_channels: int, rank: int, kernel_size: int = 3, groups: int = 1) -> nn.Conv2d:
    """A shared basis: ``rank`` filters over ``in_channels``, stride 1, 'same' padding, no bias."""
    return nn.Conv2d(in_channels, rank, kernel_size, stride=1, padding=kernel_size // 2, groups=groups, bias=False)


def basis_conv2d(x: torch.Tensor, unique: Optional[nn.Conv2d], shared: Optional[nn.Conv2d], *,
                 stride: int = 1, padding: int = 1, fused: bool = True) -> torch.Tensor:
    """``[unique || shared]`` basis convolutions of ``x``.

    ``fused=True`` concatenates the two ungrouped weights and makes one convolution: the same output and weight
    gradients as two convs and a ``torch.cat``, in fewer, larger kernels. ``fused=False`` keeps the authors' two-conv
    form (for the FLOP counter, which hooks the individual modules, and the benchmark's straightforward path).
    """
    if fused and unique is not None and shared is not None and unique.groups == shared.groups == 1:
        weight = torch.cat((unique.weight, shared.weight), dim=0)  # (u + s, C_in, kh, kw): unique filters first
        return F.conv2d(x, weight, None, stride, padding)
    parts = [_conv(m, x, stride) for m in (unique, shared) if m is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _conv(conv: nn.Conv2d, x: torch.Tensor, stride: int) -> torch.Tensor:
    # Call the module where its own stride applies, so forward hooks (the FLOP counter) see the call.
    if conv.stride == (stride, stride):
        return conv(x)
    return F.conv2d(x, conv.weight, conv.bias, stride, conv.padding, conv.dilation, conv.groups)


@dataclass
class BasisGroup:
    """The basis weights of one group: shared bases (in row order) and unique basis weights (block order)."""

    shared: list = field(default_factory=list)
    unique: list = field(default_factory=list)


def _unique_bases(block: nn.Module) -> list[nn.Conv2d]:
    # A block whose basis part is not linear (ResNeXt) names its own basis convs with unique_bases().
    if callable(getattr(block, "unique_bases", None)):
        return block.unique_bases()
    positions = block.basis_positions() if callable(getattr(block, "basis_positions", None)) else []
    return [p.unique for p in positions if p.unique is not None]


def basis_groups(model: nn.Module) -> list[BasisGroup]:
    """The groups of shared bases of ``model`` (for the regulariser and the init), found one way for all families.

    The bases are the model's own ``shared_basis*`` children (in registration order, also ones no block calls, like
    DenseNet's ``shared_basis_4``) and those its blocks hold (:func:`share_bases`). Bases used by one block form one
    group (DoubleShared's pair), whose unique weights are those blocks' own basis convs. Plain models have none.
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


@torch.no_grad()
def init_orthogonal_(model: nn.Module) -> None:
    """Start the shared bases orthonormal (SPEC section 3): one orthogonal draw per group, split between its bases, so
    a DoubleShared pair is also orthogonal to each other (one basis: the draws of ``nn.init.orthogonal_`` on it)."""
    for group in basis_groups(model):
        rows = [w.shape[0] for w in group.shared]
        joint = torch.empty(sum(rows), *group.shared[0].shape[1:])
        nn.init.orthogonal_(joint)
        for w, part in zip(group.shared, joint.split(rows)):
            w.copy_(part)


class SharedBasisConv2d(nn.Module):
    """Factorised convolution ``[unique || shared basis] -> BN -> 1x1 coefficients`` as one module.

    Args:
        in_channels, out_channels: input channels; output channels of the coefficient conv.
        unique_rank: filters in this layer's own basis (0 = shared part only).
        shared_basis: the shared ``nn.Conv2d`` (``None`` = unique part only), registered here too (one tensor).
        stride: stride of the basis convolution (the shared module itself is stride 1).
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
