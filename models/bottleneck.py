"""ILSVRC ResNet50/101, plain and with whole shared convs: the authors' later models (SPEC_v2 section 2).

The :class:`~models.resnet.ResNet` network with bottleneck blocks; blocks 2..n of a layer are :class:`SharedBottleneck`
blocks: ``*_SharedSingle`` (README "Shared") shares the 3x3 conv (``shared_basis_{g}``, [p, p, 3, 3]); ``*_Shared``
(README "Shared++") it and the 1x1 expansion (``shared_basis_{g}_1``, ``_2`` [4p, p, 1, 1]). No ranks, no unique
filters, no basis BN: nothing to fold. The tall 1x1 bases start with orthonormal columns and keep the orthogonality
penalty above a floor (SPEC_v2 section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisCfg, init_orthogonal_by_position_, make_shared_basis, share_bases, shared_bases_of
from .registry import register_model
from .resnet import ResNet


class Bottleneck(nn.Module):
    """1x1 ``conv1`` -> BN -> ReLU -> 3x3 ``conv2`` (the stride) -> BN -> ReLU -> 1x1 ``conv3`` (4x) -> BN, + shortcut
    (1x1 conv + BN ``shortcut.0/1`` where the shape changes), ReLU: torchvision's v1.5 layout, the authors' keys."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        if shortcut != "B":
            raise ValueError("the bottleneck ResNets use projection shortcuts (shortcut='B')")
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x), inplace=True)


class SharedBottleneck(nn.Module):
    """A bottleneck (``in_planes`` in and out, identity shortcut) calling the layer's ``shared_bases``, ``(3x3,)`` or
    ``(3x3, 1x1 expansion)``; it keeps its own ``conv1`` and BNs; ``unique_rank`` is unused (no ranks here)."""

    init_bases = staticmethod(init_orthogonal_by_position_)  # the authors: 1_1..4_1, then 1_2..4_2
    bases_by_position = True  # the authors' later scripts: R(all _1 bases) + R(all _2 bases)

    def __init__(self, in_planes: int, unique_rank: int, shared_bases: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        planes = in_planes // Bottleneck.expansion
        double = len(shared_bases) == 2
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        share_bases(self, shared_bases[:1], keys=["shared_basis_1" if double else "shared_basis"])
        self.bn2 = nn.BatchNorm2d(planes)
        if double:  # keys in the authors' order: shared_basis_1, bn2, shared_basis_2, bn3
            share_bases(self, shared_bases[1:], keys=["shared_basis_2"])
        else:
            self.conv3 = nn.Conv2d(planes, in_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_planes)

    @staticmethod
    def make_bases(planes: int, basis: BasisCfg, k: int) -> list[nn.Conv2d]:
        """The layer's shared 3x3 conv [p, p, 3, 3], and with two per group the 1x1 expansion conv [4p, p, 1, 1]."""
        bases = [make_shared_basis(planes, planes)]
        if basis.bases_per_group == 2:
            bases.append(make_shared_basis(planes, planes * Bottleneck.expansion, kernel_size=1))
        return bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bases = shared_bases_of(self)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(bases[0](out)), inplace=True)
        out = self.bn3((bases[1] if len(bases) == 2 else self.conv3)(out))
        return F.relu(out + x, inplace=True)


_ILSVRC = dict(
    widths=(64, 128, 256, 512), stem="imagenet", shortcut="B", block=Bottleneck, shared_block=SharedBottleneck
)
# ResNet101 plain is in the authors' --model help but not their model table; here it is simply a working model.
for _depth, _layers in (("ResNet50", (3, 4, 6, 3)), ("ResNet101", (3, 4, 23, 3))):
    _builder = partial(ResNet, _layers, **_ILSVRC)
    register_model("ilsvrc", _depth)(_builder)
    register_model("ilsvrc", f"{_depth}_SharedSingle")(_builder)
    register_model("ilsvrc", f"{_depth}_Shared", bases_per_group=2)(_builder)  # README "Shared++"
