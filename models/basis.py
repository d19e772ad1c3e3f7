"""Shared filter bases (paper section 3; SPEC section 1).

A factorised 3x3 conv is ``[unique basis conv || shared basis conv] -> basis BN -> 1x1 coefficient conv``; the shared
basis is one ``nn.Conv2d`` used by every block of a group (unique channels come first, as in the authors' files).

* **Flat keys.** The checkpoints store the parts as flat attributes of the *block* (``layer1.1.basis_conv1``), so
  blocks own them and call :func:`basis_conv2d`; :class:`SharedBasisConv2d` is the same as one module.
* **Shared parameters.** A shared conv is registered on the network *and* on every block using it (:func:`share_bases`,
  like a tied embedding): ``parameters()`` yields it once, ``state_dict()`` lists every alias, as the checkpoints do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BasisCfg:
    """How a family shares filter bases (``basis=None``: plain model). Ranks are group 1's (families scale them per
    group as the authors do); 0 = none (``SharedOnly`` has no unique filters; MobileNetV2's bases have a fixed size)."""

    bases_per_group: int = 1  # 2: one per conv position (DoubleShared); 1: used by every layer; 0: NonShared
    shared_rank: int = 0
    unique_rank: int = 0


def require_basis(basis: BasisCfg | None, family: str, counts: tuple = (1,), fixed_size: bool = False):
    """``basis``, refused unless ``family`` can build it (``counts``: its bases per group); guards direct use."""
    if basis is not None and (
        basis.bases_per_group not in counts or (fixed_size and (basis.shared_rank or basis.unique_rank))
    ):
        sizes = " and no ranks (the architecture fixes its size)" if fixed_size else ""
        count = " or ".join(map(str, counts))
        raise ValueError(f"{family} shares {count} basis per group{sizes}, not {basis}")
    return basis


class BasisPosition(NamedTuple):
    """The parts of one factorised conv, as found in a block (for folding, FLOP counting and tests)."""

    unique: nn.Conv2d | None
    shared: nn.Conv2d | None
    basis_bn: nn.BatchNorm2d
    coeff: nn.Conv2d


def register_bases(
    module: nn.Module, bases: Sequence[nn.Conv2d], name: str, keys: Sequence[str] | None = None
) -> tuple:
    """Register ``bases`` on ``module`` under ``keys``, by default ``name`` for one basis and ``name_1``, ``name_2``...
    for several (the checkpoints' keys); returns the keys."""
    if keys is None:
        keys = (name,) if len(bases) == 1 else [f"{name}_{j}" for j in range(1, len(bases) + 1)]
    for key, basis in zip(keys, bases):
        setattr(module, key, basis)
    return tuple(keys)


def share_bases(block: nn.Module, bases: Sequence[nn.Conv2d], keys: Sequence[str] | None = None) -> None:
    """Register shared bases as aliases on the ``block`` using them (:func:`register_bases` keys ``shared_basis*``) and
    record them for :func:`shared_bases_of`, where the block's keys must come (calls append to the record)."""
    block.shared_basis_names = getattr(block, "shared_basis_names", ()) + register_bases(
        block, bases, "shared_basis", keys
    )


def shared_bases_of(block: nn.Module) -> list[nn.Conv2d]:
    """The shared bases registered on ``block`` by :func:`share_bases`, in order (``[]`` for other modules)."""
    return [getattr(block, key) for key in getattr(block, "shared_basis_names", ())]


def make_shared_basis(in_channels: int, rank: int, kernel_size: int = 3, groups: int = 1) -> nn.Conv2d:
    """A shared basis: ``rank`` filters over ``in_channels``, stride 1, 'same' padding, no bias."""
    return nn.Conv2d(in_channels, rank, kernel_size, stride=1, padding=kernel_size // 2, groups=groups, bias=False)


def basis_conv2d(
    x: torch.Tensor,
    unique: nn.Conv2d | None,
    shared: nn.Conv2d | None,
    *,
    stride: int = 1,
    padding: int = 1,
    fused: bool = True,
) -> torch.Tensor:
    """``[unique || shared]`` basis convolutions of ``x``: with ``fused``, one conv over the concatenated weights (the
    same outputs and gradients in fewer kernels), else the authors' two convs (which the FLOP counter hooks)."""
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


class BasisGroup(NamedTuple):
    """The basis weights of one group: shared bases (in row order) and unique basis weights (block order)."""

    shared: list
    unique: list


def _unique_bases(block: nn.Module) -> list[nn.Conv2d]:
    # A block whose basis part is not linear (ResNeXt) names its own basis convs with unique_bases().
    if callable(getattr(block, "unique_bases", None)):
        return block.unique_bases()
    positions = block.basis_positions() if callable(getattr(block, "basis_positions", None)) else []
    return [p.unique for p in positions if p.unique is not None]


def basis_groups(model: nn.Module) -> list[BasisGroup]:
    """The groups of shared bases of ``model``, its ``shared_basis*`` children (also unused ones) and its blocks'
    (:func:`share_bases`): bases used by one block form one group, with those blocks' own basis convs as unique."""
    bases = {id(m): m for n, m in model.named_children() if n.startswith("shared_basis")}
    users = [(block, shared_bases_of(block)) for block in model.modules() if shared_bases_of(block)]
    leader = {}  # id of a basis -> id of the first basis of its group
    for _, held in users:
        for m in held:
            bases.setdefault(id(m), m)
            leader.setdefault(id(m), id(held[0]))
    groups: dict[int, BasisGroup] = {}
    for key, m in bases.items():
        groups.setdefault(leader.get(key, key), BasisGroup([], [])).shared.append(m.weight)
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


def split_by_position(groups: Sequence[BasisGroup]) -> list[list]:
    """For each position j, the j-th shared basis weight of every group that has one (the authors' later models
    initialise and regularise each position apart)."""
    depth = max((len(g.shared) for g in groups), default=0)
    return [[g.shared[j] for g in groups if j < len(g.shared)] for j in range(depth)]


@torch.no_grad()
def init_orthogonal_by_position_(model: nn.Module) -> None:
    """Each shared basis orthogonal on its own, position by position: every group's first basis, then every group's
    second (the authors' later models, SPEC_v2 section 2; a tall basis gets orthonormal columns)."""
    for position in split_by_position(basis_groups(model)):
        for weight in position:
            nn.init.orthogonal_(weight)


class SharedBasisConv2d(nn.Module):
    """Factorised convolution ``[unique || shared basis] -> BN -> 1x1 coefficients`` as one module: ``unique_rank``
    own filters (0 = none) and the ``shared_basis`` conv (None = none; stride 1, the ``stride`` is applied here)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        unique_rank: int,
        shared_basis: nn.Conv2d | None = None,
        *,
        stride: int = 1,
        fused: bool = True,
    ) -> None:
        super().__init__()
        shared_rank = shared_basis.out_channels if shared_basis is not None else 0
        if unique_rank + shared_rank <= 0:
            raise ValueError("SharedBasisConv2d needs unique_rank > 0 or a shared basis")
        if shared_basis is not None and shared_basis.in_channels != in_channels:
            raise ValueError(f"shared basis takes {shared_basis.in_channels} input channels, not {in_channels}")
        self.stride = stride
        self.fused = fused
        self.shared_basis = None  # replaced by the basis, if any
        share_bases(self, [shared_basis] if shared_basis is not None else [])
        self.basis_conv = (
            nn.Conv2d(in_channels, unique_rank, 3, stride=stride, padding=1, bias=False) if unique_rank > 0 else None
        )
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
