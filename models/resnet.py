"""ResNets with shared filter bases for CIFAR-10, CIFAR-100 and ILSVRC (paper section 4; SPEC sections 1-3).

One :class:`ResNet` class covers the three families (they differ in stem, widths, shortcut type) and, with the blocks
of :mod:`models.bottleneck`, the later ILSVRC ResNet50/101. In every group block 1 is plain and blocks 2..n are shared;
group g uses ``s*k`` shared and ``u*k`` unique filters, ``k = width_g / width_1``. Attribute names and registration
order are the authors' checkpoint keys, construction order theirs too (``torch.manual_seed`` gives their weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import (
    BasisCfg,
    BasisPosition,
    basis_conv2d,
    init_orthogonal_,
    make_shared_basis,
    register_bases,
    share_bases,
    shared_bases_of,
)
from .folding import fold_factorised
from .registry import register_model


class DownsampleA(nn.Module):
    """CIFAR-10 "option A" shortcut: subsample by 2, zero-pad channels (no parameters, no checkpoint keys)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Plain residual block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    expansion = 1  # output channels per ``planes`` (a bottleneck block would have 4)

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
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class SharedBasicBlock(nn.Module):
    """Residual block (``planes`` in and out, identity shortcut), its 3x3 convs factorised over ``shared_bases``: ``()``
    (NonShared), ``(b,)`` (both positions) or ``(b1, b2)``, plus ``unique_rank`` own filters per position (0: none)."""

    def __init__(self, planes: int, unique_rank: int, shared_bases: Sequence[nn.Conv2d] = ()) -> None:
        super().__init__()
        self.fused = True
        share_bases(self, shared_bases)  # checkpoint keys `shared_basis` or `shared_basis_1/_2`, first in order
        for i in (1, 2):
            shared = self._shared(i)
            rank = unique_rank + (shared.out_channels if shared is not None else 0)
            if unique_rank:
                setattr(self, f"basis_conv{i}", nn.Conv2d(planes, unique_rank, 3, padding=1, bias=False))
            setattr(self, f"basis_bn{i}", nn.BatchNorm2d(rank))
            setattr(self, f"coeff_conv{i}", nn.Conv2d(rank, planes, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(planes))

    init_bases = staticmethod(init_orthogonal_)  # how the network starts the bases of these blocks

    @staticmethod
    def make_bases(planes: int, basis: BasisCfg, k: int) -> list[nn.Conv2d]:
        """The shared bases of a group of these blocks (the network registers them before the group)."""
        return [make_shared_basis(planes, basis.shared_rank * k) for _ in range(basis.bases_per_group)]

    def _shared(self, i: int) -> nn.Conv2d | None:
        bases = shared_bases_of(self)
        return bases[(i - 1) % len(bases)] if bases else None

    def basis_positions(self) -> list[BasisPosition]:
        return [
            BasisPosition(
                getattr(self, f"basis_conv{i}", None),
                self._shared(i),
                getattr(self, f"basis_bn{i}"),
                getattr(self, f"coeff_conv{i}"),
            )
            for i in (1, 2)
        ]

    @torch.no_grad()
    def folded(self) -> BasicBlock:
        """The eval-mode equivalent plain block (:func:`~models.folding.fold_factorised` per position); each conv's bias
        goes into the following BN's running mean."""
        planes = self.bn1.num_features
        block = BasicBlock(planes, planes).to(self.bn1.weight.device, self.bn1.weight.dtype)
        for i, position in enumerate(self.basis_positions(), 1):
            conv, bias = fold_factorised(position)
            setattr(block, f"conv{i}", conv)
            bn = getattr(block, f"bn{i}")
            bn.load_state_dict(getattr(self, f"bn{i}").state_dict())
            bn.running_mean.sub_(bias)
        return block.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (unique, shared, basis_bn, coeff) in enumerate(self.basis_positions(), 1):
            out = getattr(self, f"bn{i}")(coeff(basis_bn(basis_conv2d(out, unique, shared, fused=self.fused))))
            if i == 1:
                out = F.relu(out, inplace=True)
        return F.relu(out + x, inplace=True)


class ResNet(nn.Module):
    """ResNet with ``layers`` blocks and ``widths`` planes per group; ``stem`` ``"cifar"`` (3x3 conv) or ``"imagenet"``
    (7x7 stride-2 conv + max-pool); ``shortcut`` ``"A"`` (parameter-free) or ``"B"`` (1x1 conv + BN). With ``basis``,
    blocks 2..n of a group are ``shared_block``s over its ``shared_block.make_bases(...)``, begun by ``init_bases``."""

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        *,
        stem: str = "cifar",
        shortcut: str = "B",
        basis: BasisCfg | None = None,
        block: type = BasicBlock,
        shared_block: type = SharedBasicBlock,
    ) -> None:
        super().__init__()
        self.basis_cfg = basis
        self.bases_by_position = getattr(shared_block, "bases_by_position", False)  # the regulariser's form
        kernel, stride, padding = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
        self.conv1 = nn.Conv2d(3, widths[0], kernel, stride=stride, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        in_planes = widths[0]
        for g, (blocks, planes) in enumerate(zip(layers, widths), 1):
            k = planes // widths[0]
            bases = []
            if basis is not None:
                bases = shared_block.make_bases(planes, basis, k)
                register_bases(self, bases, f"shared_basis_{g}")  # `shared_basis_{g}` or `shared_basis_{g}_{j}`
            group = [block(in_planes, planes, 1 if g == 1 else 2, shortcut)]
            in_planes = planes * block.expansion
            for _ in range(1, blocks):
                group.append(
                    block(in_planes, planes, 1, shortcut)
                    if basis is None
                    else shared_block(in_planes, basis.unique_rank * k, bases)
                )
            setattr(self, f"layer{g}", nn.Sequential(*group))
        self.num_groups = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        shared_block.init_bases(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for g in range(1, self.num_groups + 1):
            x = getattr(self, f"layer{g}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_FAMILIES = {
    "cifar10": dict(widths=(16, 32, 64), stem="cifar", shortcut="A"),
    "cifar100": dict(widths=(64, 128, 256, 512), stem="cifar", shortcut="B"),
    "ilsvrc": dict(widths=(64, 128, 256, 512), stem="imagenet", shortcut="B"),
}
_DEPTHS = {
    "ResNet20": (3, 3, 3),
    "ResNet32": (5, 5, 5),
    "ResNet44": (7, 7, 7),
    "ResNet56": (9, 9, 9),
    "ResNet110": (18, 18, 18),
    "ResNet1202": (200, 200, 200),
    "ResNet18": (2, 2, 2, 2),
    "ResNet34": (3, 4, 6, 3),
}


def _register(dataset: str, depth: str, variant: str | None = None, **options) -> None:
    family = _FAMILIES[dataset]
    register_model(
        dataset, depth if variant is None else f"{depth}_{variant}", channels=family["widths"][0], **options
    )(partial(ResNet, _DEPTHS[depth], **family))


for _depth in ("ResNet20", "ResNet32", "ResNet44", "ResNet56", "ResNet110", "ResNet1202"):
    _register("cifar10", _depth)
for _depth in ("ResNet32", "ResNet56"):
    for _variant in ("DoubleShared", "SingleShared", "SharedOnly", "NonShared"):
        _register("cifar10", _depth, _variant)

for _depth in ("ResNet18", "ResNet34"):
    _register("cifar100", _depth)
    _register("ilsvrc", _depth)
for _variant in ("SingleShared", "SharedOnly", "NonShared"):
    # CIFAR-100's SharedOnly uses one basis per group for both positions (CIFAR-10's uses two).
    _register("cifar100", "ResNet34", _variant, **({"bases_per_group": 1} if _variant == "SharedOnly" else {}))
for _variant in ("SingleShared", "DoubleShared"):
    _register("ilsvrc", "ResNet34", _variant, shared_rank=32)
