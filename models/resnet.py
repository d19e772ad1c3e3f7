"""ResNets with shared filter bases for CIFAR-10, CIFAR-100 and ILSVRC (paper section 4; SPEC sections 1-3).

One :class:`ResNet` class covers the three families; they differ only in data: stem (3x3 conv, or 7x7 conv + max-pool),
stage widths, shortcut type (parameter-free "option A" on CIFAR-10, 1x1 conv + BN elsewhere) and head size. The
variants of the paper are a :class:`BasisCfg`:

=================  ==========================  ==========================================
variant            bases per group             factorised conv of a shared block
=================  ==========================  ==========================================
``DoubleShared``   2 (one per conv position)   [unique || shared_g_j] -> BN -> 1x1
``SingleShared``   1 (used by both positions)  [unique || shared_g] -> BN -> 1x1
``SharedOnly``     2 (CIFAR-10) / 1 (CIFAR-100) shared_g(_j) -> BN -> 1x1
``NonShared``      0                           unique -> BN -> 1x1
=================  ==========================  ==========================================

The first block of every group (including group 1) is a plain block; blocks 2..n are shared blocks. Ranks scale with
the group width: group g uses ``s*k`` shared and ``u*k`` unique filters, ``k = width_g / width_1``.

Attribute names and registration order are the checkpoint keys of the authors' code and must not change; module
construction order also matches theirs, so ``torch.manual_seed(0)`` builds the same initial weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisPosition, basis_conv2d, make_shared_basis
from .fold import conv_with_bias, dense_is_cheaper, fold_position, fold_position_low_rank
from .registry import register_model


@dataclass(frozen=True)
class BasisCfg:
    """How the 3x3 convs of shared blocks are factorised.

    Args:
        bases_per_group: shared bases per group: 2 (one per conv position), 1 (both positions) or 0 (NonShared).
        shared_rank: filters per shared basis in group 1 (scaled by the group's width multiplier).
        unique_rank: filters in each conv's own basis in group 1 (0 = SharedOnly).
    """

    bases_per_group: int
    shared_rank: int = 0
    unique_rank: int = 0


class DownsampleA(nn.Module):
    """CIFAR-10 "option A" shortcut: subsample by 2, zero-pad channels (no parameters, no checkpoint keys)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Plain residual block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = DownsampleA(planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class SharedBasicBlock(nn.Module):
    """Residual block whose two 3x3 convs are factorised over the group's shared bases.

    Shared blocks never downsample, so the shortcut is the identity.

    Args:
        planes: channels in and out.
        unique_rank: filters of each position's own basis (0 = none).
        shared_bases: the group's bases: ``()`` (NonShared), ``(b,)`` (both positions use b) or ``(b1, b2)``.
    """

    def __init__(self, planes: int, unique_rank: int, shared_bases: Sequence[nn.Conv2d] = ()) -> None:
        super().__init__()
        self.fused = True
        # Alias registrations of the group's bases: checkpoint keys `shared_basis` or `shared_basis_1/_2`.
        if len(shared_bases) == 1:
            self.shared_basis = shared_bases[0]
        else:
            for j, basis in enumerate(shared_bases, 1):
                setattr(self, f"shared_basis_{j}", basis)
        self._n_bases = len(shared_bases)
        for i in (1, 2):
            shared = shared_bases[(i - 1) % len(shared_bases)] if shared_bases else None
            rank = unique_rank + (shared.out_channels if shared is not None else 0)
            if unique_rank:
                setattr(self, f"basis_conv{i}", nn.Conv2d(planes, unique_rank, 3, padding=1, bias=False))
            setattr(self, f"basis_bn{i}", nn.BatchNorm2d(rank))
            setattr(self, f"coeff_conv{i}", nn.Conv2d(rank, planes, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(planes))

    def _shared(self, i: int) -> Optional[nn.Conv2d]:
        if self._n_bases == 0:
            return None
        return self.shared_basis if self._n_bases == 1 else getattr(self, f"shared_basis_{i}")

    def basis_positions(self) -> list[BasisPosition]:
        return [BasisPosition(getattr(self, f"basis_conv{i}", None), self._shared(i), getattr(self, f"basis_bn{i}"),
                              getattr(self, f"coeff_conv{i}")) for i in (1, 2)]

    @torch.no_grad()
    def folded(self) -> BasicBlock:
        """The eval-mode equivalent plain block. Each factorised conv becomes one dense 3x3 conv where that is no more
        work (then the block is exactly a plain ``BasicBlock``), else a basis conv + 1x1 conv without the basis BN;
        either way its bias is absorbed into the following BatchNorm's running mean."""
        planes = self.bn1.num_features
        block = BasicBlock(planes, planes).to(self.bn1.weight.device, self.bn1.weight.dtype)
        for i, position in enumerate(self.basis_positions(), 1):
            if dense_is_cheaper(position):
                weight, bias = fold_position(position)
                getattr(block, f"conv{i}").weight.copy_(weight)
            else:
                basis, coeff, bias = fold_position_low_rank(position)
                template = nn.Conv2d(1, 1, 3, padding=1, bias=False)
                setattr(block, f"conv{i}", nn.Sequential(conv_with_bias(template, basis, None),
                                                         conv_with_bias(position.coeff, coeff, None)))
            bn = getattr(block, f"bn{i}")
            bn.load_state_dict(getattr(self, f"bn{i}").state_dict())
            bn.running_mean.sub_(bias)
        return block.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (unique, shared, basis_bn, coeff) in enumerate(self.basis_positions(), 1):
            out = coeff(basis_bn(basis_conv2d(out, unique, shared, fused=self.fused)))
            out = getattr(self, f"bn{i}")(out)
            if i == 1:
                out = F.relu(out, inplace=True)
        return F.relu(out + x, inplace=True)


class ResNet(nn.Module):
    """ResNet for CIFAR or ImageNet-sized inputs, plain or with shared filter bases.

    Args:
        layers: blocks per group, e.g. ``(9, 9, 9)`` or ``(3, 4, 6, 3)``.
        widths: channels per group, e.g. ``(16, 32, 64)``.
        num_classes: classifier outputs.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv + 3x3 max-pool).
        shortcut: ``"A"`` (CIFAR-10, parameter-free) or ``"B"`` (1x1 conv + BN).
        basis: factorisation of blocks 2..n of each group; None = plain ResNet.
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int], num_classes: int, *, stem: str = "cifar",
                 shortcut: str = "B", basis: Optional[BasisCfg] = None) -> None:
        super().__init__()
        self.basis_cfg = basis
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        in_planes = widths[0]
        for g, (blocks, planes) in enumerate(zip(layers, widths), 1):
            k = planes // widths[0]
            bases = []
            if basis is not None:
                for j in range(basis.bases_per_group):
                    bases.append(make_shared_basis(planes, basis.shared_rank * k))
                    name = f"shared_basis_{g}" if basis.bases_per_group == 1 else f"shared_basis_{g}_{j + 1}"
                    setattr(self, name, bases[-1])
            stride = 1 if g == 1 else 2
            group = [BasicBlock(in_planes, planes, stride, shortcut)]
            for _ in range(1, blocks):
                if basis is None:
                    group.append(BasicBlock(planes, planes, 1, shortcut))
                else:
                    group.append(SharedBasicBlock(planes, basis.unique_rank * k, bases))
            setattr(self, f"layer{g}", nn.Sequential(*group))
            in_planes = planes
        self.num_groups = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Shared bases start orthonormal; a group's pair is drawn as one orthogonal matrix and split, so the two
        # bases are also orthogonal to each other.
        for bases in self.shared_bases():
            init_orthogonal_(bases)

    def shared_bases(self) -> list[list[nn.Conv2d]]:
        """The shared bases of each group, in order (empty list for plain and NonShared models)."""
        if self.basis_cfg is None or self.basis_cfg.bases_per_group == 0:
            return []
        n = self.basis_cfg.bases_per_group
        return [[getattr(self, f"shared_basis_{g}" if n == 1 else f"shared_basis_{g}_{j}") for j in range(1, n + 1)]
                for g in range(1, self.num_groups + 1)]

    def basis_groups(self) -> list["BasisGroup"]:
        """Per group: the shared basis weights and the unique basis weights (block order), for the regulariser."""
        from .regularizer import BasisGroup
        groups = []
        for g in range(1, self.num_groups + 1):
            layer = getattr(self, f"layer{g}")
            unique = [pos.unique.weight for block in layer if isinstance(block, SharedBasicBlock)
                      for pos in block.basis_positions() if pos.unique is not None]
            shared = [b.weight for b in self.shared_bases()[g - 1]] if self.shared_bases() else []
            groups.append(BasisGroup(shared=shared, unique=unique))
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for g in range(1, self.num_groups + 1):
            x = getattr(self, f"layer{g}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@torch.no_grad()
def init_orthogonal_(bases: Sequence[nn.Conv2d]) -> None:
    """Draw one orthogonal matrix with the rows of all ``bases`` and split it between them."""
    rows = [b.weight.shape[0] for b in bases]
    joint = torch.empty(sum(rows), *bases[0].weight.shape[1:])
    nn.init.orthogonal_(joint)
    for b, part in zip(bases, joint.split(rows)):
        b.weight.copy_(part)


# ----------------------------------------------------------------------------------------------------------------
# Registered models: the reference scripts' names and default ranks.

_CIFAR10 = dict(widths=(16, 32, 64), stem="cifar", shortcut="A")
_CIFAR100 = dict(widths=(64, 128, 256, 512), stem="cifar", shortcut="B")
_ILSVRC = dict(widths=(64, 128, 256, 512), stem="imagenet", shortcut="B")
_DEPTHS = {"ResNet20": (3, 3, 3), "ResNet32": (5, 5, 5), "ResNet44": (7, 7, 7), "ResNet56": (9, 9, 9),
           "ResNet110": (18, 18, 18), "ResNet1202": (200, 200, 200), "ResNet18": (2, 2, 2, 2),
           "ResNet34": (3, 4, 6, 3)}


def _build(depth: str, family: dict, variant: Optional[str], num_classes: int, shared_rank: int = 0,
           unique_rank: int = 0, shared_only_bases: int = 2) -> ResNet:
    bases = {None: None, "DoubleShared": 2, "SingleShared": 1, "SharedOnly": shared_only_bases, "NonShared": 0}[variant]
    if variant == "SharedOnly":
        unique_rank = 0
    if variant == "NonShared":
        shared_rank = 0
    basis = None if variant is None else BasisCfg(bases, shared_rank, unique_rank)
    return ResNet(_DEPTHS[depth], num_classes=num_classes, basis=basis, **family)


_VARIANT_RANKS = {"DoubleShared": ("shared_rank", "unique_rank"), "SingleShared": ("shared_rank", "unique_rank"),
                  "SharedOnly": ("shared_rank",), "NonShared": ("unique_rank",)}


def _register(dataset: str, family: dict, depth: str, variant: Optional[str] = None, default_shared: int = 16,
              **extra) -> None:
    name = depth if variant is None else f"{depth}_{variant}"
    rank_args = _VARIANT_RANKS.get(variant, ())
    defaults = {k: v for k, v in (("shared_rank", default_shared), ("unique_rank", 1)) if k in rank_args}
    register_model(dataset, name, rank_args=rank_args, **defaults)(
        partial(_build, depth, family, variant, **extra))


for _depth in ("ResNet20", "ResNet32", "ResNet44", "ResNet56", "ResNet110", "ResNet1202"):
    _register("cifar10", _CIFAR10, _depth)
for _depth in ("ResNet32", "ResNet56"):
    for _variant in ("DoubleShared", "SingleShared", "SharedOnly", "NonShared"):
        _register("cifar10", _CIFAR10, _depth, _variant)

for _depth in ("ResNet18", "ResNet34"):
    _register("cifar100", _CIFAR100, _depth)
    _register("ilsvrc", _ILSVRC, _depth)
for _variant in ("SingleShared", "SharedOnly", "NonShared"):
    # CIFAR-100's SharedOnly uses one basis per group for both positions (CIFAR-10's uses two).
    _register("cifar100", _CIFAR100, "ResNet34", _variant, shared_only_bases=1)
for _variant in ("SingleShared", "DoubleShared"):
    _register("ilsvrc", _ILSVRC, "ResNet34", _variant, default_shared=32)
