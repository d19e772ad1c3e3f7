"""ResNeXt-50 (32x4d) for CIFAR-100, plain and with shared grouped filter bases (paper section 4.2; SPEC 2.5, 4).

As in the ResNets, block 1 of every layer is plain and blocks 2..n are shared: their grouped 3x3 conv becomes
``[unique (u*k filters, u*k/4 groups) || shared (s*k filters, s/4 groups)] -> bn2 -> ReLU``, then their own 1x1
``conv3``. That ReLU makes the basis part non-linear (no ``basis_positions``); the group counts make it two convs.

Ranks must be multiples of 4 (filters per group) whose group counts divide the input width: the paper's row
"ResNeXt50-S16U1" is shared_rank=64, unique_rank=4 (its layer-1 group counts; SPEC section 9), the registry's
defaults. The authors' scripts build neither that at their defaults (16, 1) nor the plain ``ResNext50``.

Attribute names are checkpoint keys and construction order is the authors', so ``torch.manual_seed`` reproduces their
initial weights: PyTorch defaults, then each shared basis orthogonal on its own (SPEC section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisCfg, basis_conv2d, init_orthogonal_, make_shared_basis, require_basis, share_bases
from .folding import bn_affine, conv_with_bias, fold_conv_bn
from .registry import register_model

EXPANSION = 4
FILTERS_PER_GROUP = 4  # filters per group of both grouped bases (the authors divide ranks by base_width and by 4)


class ResNeXtBlock(nn.Module):
    """Plain ResNeXt bottleneck: 1x1 -> BN -> ReLU -> grouped 3x3 (stride) -> BN -> ReLU -> 1x1 -> BN, + shortcut,
    ReLU; its inner ReLUs are modules (ptflops counts them), the final one is not (a throwaway in the authors' code)."""

    def __init__(self, in_channels: int, planes: int, width: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x), inplace=True)


class SharedResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (``4 * planes`` in and out, identity shortcut) whose grouped 3x3 conv is ``[unique ||
    shared]`` grouped bases over the inner ``width``: ``unique_rank`` own filters and the layer's ``shared_basis``."""

    def __init__(self, planes: int, width: int, unique_rank: int, shared_basis: nn.Conv2d) -> None:
        super().__init__()
        channels = planes * EXPANSION
        rank = unique_rank + shared_basis.out_channels
        share_bases(self, [shared_basis])  # first in the checkpoint's key order
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.basis_conv2 = nn.Conv2d(
            width, unique_rank, 3, padding=1, groups=unique_rank // FILTERS_PER_GROUP, bias=False
        )
        self.bn2 = nn.BatchNorm2d(rank)
        self.conv3 = nn.Conv2d(rank, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def unique_bases(self) -> list[nn.Conv2d]:
        """The block's own basis, for :func:`~models.basis.basis_groups`. Its filters span another input space
        (``width / groups`` channels) than the shared ones, so only the shared-only regulariser form applies."""
        return [self.basis_conv2]

    @torch.no_grad()
    def folded(self) -> FoldedSharedResNeXtBlock:
        """The eval-mode equivalent block, every BN folded into the conv before it: ``bn2`` cannot cross its ReLU to
        ``conv3``, so it scales the two grouped bases (the shared one becomes this block's own copy)."""
        u = self.basis_conv2.out_channels
        scale, shift = bn_affine(self.bn2)
        scale = scale.view(-1, 1, 1, 1)
        return FoldedSharedResNeXtBlock(
            fold_conv_bn(self.conv1, self.bn1),
            conv_with_bias(self.basis_conv2, self.basis_conv2.weight * scale[:u], shift[:u]),
            conv_with_bias(self.shared_basis, self.shared_basis.weight * scale[u:], shift[u:]),
            fold_conv_bn(self.conv3, self.bn3),
        ).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = basis_conv2d(out, self.basis_conv2, self.shared_basis)  # (N, u*k + s*k, H, W); grouped: two convs
        out = F.relu(self.bn2(out), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + x, inplace=True)


class FoldedSharedResNeXtBlock(nn.Module):
    """Eval-only :class:`SharedResNeXtBlock`, BNs folded in: ``conv1`` -> ReLU -> ``[basis_conv2 || shared_conv2]``
    (grouped, the block's own) -> ReLU -> ``conv3``, + x, ReLU."""

    def __init__(self, conv1: nn.Conv2d, basis_conv2: nn.Conv2d, shared_conv2: nn.Conv2d, conv3: nn.Conv2d) -> None:
        super().__init__()
        self.conv1, self.basis_conv2, self.shared_conv2, self.conv3 = conv1, basis_conv2, shared_conv2, conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(torch.cat((self.basis_conv2(out), self.shared_conv2(out)), 1), inplace=True)
        return F.relu(self.conv3(out) + x, inplace=True)


def _check_groups(what: str, rank: int, width: int, layer: int) -> None:
    groups = rank // FILTERS_PER_GROUP
    if rank % FILTERS_PER_GROUP or groups <= 0 or width % groups:
        raise ValueError(
            f"ResNeXt's grouped bases hold {FILTERS_PER_GROUP} filters per group, so {what} must be a "
            f"positive multiple of {FILTERS_PER_GROUP} whose group count divides the conv's input width "
            f"(layer {layer}: {rank} filters in {groups} groups over {width} channels)"
        )


class ResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs, plain or with one shared grouped basis per layer (``BasisCfg(1, s, u)``: layer g's has
    ``s * 2^(g-1)`` filters in ``s / 4`` groups, its unique ones ``u * 2^(g-1)`` in groups of 4, as the module says)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int,
        *,
        cardinality: int = 32,
        base_width: int = 4,
        basis: BasisCfg | None = None,
    ) -> None:
        super().__init__()
        self.basis_cfg = require_basis(basis, "ResNeXt")
        self.num_layers = len(layers)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for g, blocks in enumerate(layers, 1):
            planes = 64 * 2 ** (g - 1)
            k = planes // 64
            width = int(planes * base_width / 64) * cardinality
            shared = None
            if basis is not None:
                s, u = basis.shared_rank, basis.unique_rank * k
                _check_groups("shared_rank", s, width, g)
                _check_groups("unique_rank", u, width, g)
                # The shared basis has s*k filters but s/4 groups in every layer (4k filters per group).
                shared = make_shared_basis(width, s * k, groups=s // FILTERS_PER_GROUP)
                setattr(self, f"shared_basis_{g}", shared)
            group = [ResNeXtBlock(in_channels, planes, width, cardinality, stride=1 if g == 1 else 2)]
            in_channels = planes * EXPANSION
            for _ in range(1, blocks):
                group.append(
                    ResNeXtBlock(in_channels, planes, width, cardinality)
                    if shared is None
                    else SharedResNeXtBlock(planes, width, u, shared)
                )
            setattr(self, f"layer{g}", nn.Sequential(*group))
        self.linear = nn.Linear(in_channels, num_classes)
        init_orthogonal_(self)  # each basis orthogonal on its own, in layer order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        for g in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{g}")(x)
        x = F.avg_pool2d(x, 4)  # the authors' fixed 4x4 pooling: a 32x32 input ends at 4x4
        return self.linear(torch.flatten(x, 1))


_RESNEXT50 = (3, 4, 6, 3)
register_model("cifar100", "ResNext50")(partial(ResNeXt, _RESNEXT50))
register_model(
    "cifar100", "ResNext50_SingleShared", channels=128, rank_multiple=FILTERS_PER_GROUP, shared_rank=64, unique_rank=4
)(partial(ResNeXt, _RESNEXT50))
