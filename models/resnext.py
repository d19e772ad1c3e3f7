"""ResNeXt-50 (32x4d) for CIFAR-100, plain and with shared grouped filter bases (paper section 4.2; SPEC 2.5, 4).

One :class:`ResNeXt` class covers both models. As in the ResNets, the first block of every layer is a plain
bottleneck and blocks 2..n are shared. A shared bottleneck replaces the grouped 3x3 conv by

    [unique grouped 3x3 (u*k filters, u*k/4 groups) || shared grouped 3x3 (s*k filters, s/4 groups)] -> bn2 -> ReLU

followed by the bottleneck's own 1x1 expansion ``conv3`` (which plays the coefficient conv's role). Unlike the
ResNets' factorised conv, the basis BN *is* followed by a ReLU, so the basis part is not linear and blocks expose no
``basis_positions``; and the two bases have different group counts, so they cannot be computed as one conv
(:func:`~models.basis.basis_conv2d` falls back to two convs and a concatenation).

For inference, :meth:`SharedBottleneck.folded` (used by :func:`models.fold`) folds ``bn1``, ``bn2`` and ``bn3``
into the convs before them; the two grouped bases stay two convs.

Both bases put 4 filters in each group, so both ranks must be multiples of 4 and the group counts must divide the
conv's input width (``128 * k``): the paper's row "ResNeXt50-S16U1" is built with shared_rank=64, unique_rank=4 (16
and 1 are its layer-1 group counts; SPEC section 9). The authors' scripts cannot build the plain ``ResNext50`` (its
constructor wants a class count they never pass) nor the shared one at the default ranks (16, 1); the registry builds
both, with defaults 64/4, and rejects ranks that cannot form groups with a ValueError.

Attribute names are checkpoint keys and construction order is the authors', so ``torch.manual_seed`` reproduces their
initial weights: PyTorch defaults, then each shared basis orthogonal on its own (SPEC section 3).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import basis_conv2d, make_shared_basis
from .fold import bn_affine, conv_with_bias, fold_conv_bn
from .registry import register_model

EXPANSION = 4
FILTERS_PER_GROUP = 4  # filters per group of both grouped bases (the authors divide ranks by base_width and by 4)


class Bottleneck(nn.Module):
    """Plain ResNeXt bottleneck: 1x1 -> BN -> ReLU -> grouped 3x3 (stride) -> BN -> ReLU -> 1x1 -> BN, + shortcut,
    ReLU. Keys ``residual_function.{0,1,3,4,6,7}`` and ``shortcut.{0,1}``; its two inner ReLUs are modules (counted by
    ptflops), the final one is not (the authors build a throwaway ``nn.ReLU`` in forward, which no hook sees)."""

    def __init__(self, in_channels: int, planes: int, width: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x), inplace=True)


class SharedBottleneck(nn.Module):
    """ResNeXt bottleneck whose grouped 3x3 conv is ``[unique || shared]`` grouped bases (see module docstring).

    Shared blocks never downsample and keep the channel count, so the shortcut is the identity (no keys).

    Args:
        planes: the layer's base width; in and out channels are ``4 * planes``.
        width: inner width (input channels of both bases).
        unique_rank: filters of the block's own basis (``u * k``), in ``unique_rank / 4`` groups.
        shared_basis: the layer's shared grouped ``nn.Conv2d`` (registered here as ``shared_basis``).
    """

    def __init__(self, planes: int, width: int, unique_rank: int, shared_basis: nn.Conv2d) -> None:
        super().__init__()
        channels = planes * EXPANSION
        rank = unique_rank + shared_basis.out_channels
        self.shared_basis = shared_basis  # alias registration; first in the checkpoint's key order
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.basis_conv2 = nn.Conv2d(width, unique_rank, 3, padding=1, groups=unique_rank // FILTERS_PER_GROUP,
                                     bias=False)
        self.bn2 = nn.BatchNorm2d(rank)
        self.conv3 = nn.Conv2d(rank, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    @torch.no_grad()
    def folded(self) -> "FoldedSharedBottleneck":
        """The eval-mode equivalent block with every BatchNorm folded into the conv before it (convs with bias).

        The basis BN ``bn2`` is followed by a ReLU, so it cannot reach ``conv3``: it folds into the two grouped basis
        convs instead (each scaled by its slice of ``bn2``; the shared one becomes this block's own copy), which stay
        two grouped convs, as their group counts differ. ``bn1`` and ``bn3`` fold into ``conv1`` and ``conv3``.
        """
        u = self.basis_conv2.out_channels
        scale, shift = bn_affine(self.bn2)
        scale = scale.view(-1, 1, 1, 1)
        return FoldedSharedBottleneck(
            fold_conv_bn(self.conv1, self.bn1),
            conv_with_bias(self.basis_conv2, self.basis_conv2.weight * scale[:u], shift[:u]),
            conv_with_bias(self.shared_basis, self.shared_basis.weight * scale[u:], shift[u:]),
            fold_conv_bn(self.conv3, self.bn3)).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = basis_conv2d(out, self.basis_conv2, self.shared_basis)  # (N, u*k + s*k, H, W); grouped: two convs
        out = F.relu(self.bn2(out), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + x, inplace=True)


class FoldedSharedBottleneck(nn.Module):
    """Eval-only form of :class:`SharedBottleneck` (from its :meth:`~SharedBottleneck.folded`): ``conv1`` -> ReLU ->
    ``[basis_conv2 || shared_conv2]`` (grouped, the block's own) -> ReLU -> ``conv3``, + x, ReLU; all convs with the
    BatchNorm after them folded in."""

    def __init__(self, conv1: nn.Conv2d, basis_conv2: nn.Conv2d, shared_conv2: nn.Conv2d, conv3: nn.Conv2d) -> None:
        super().__init__()
        self.conv1, self.basis_conv2, self.shared_conv2, self.conv3 = conv1, basis_conv2, shared_conv2, conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(torch.cat((self.basis_conv2(out), self.shared_conv2(out)), 1), inplace=True)
        return F.relu(self.conv3(out) + x, inplace=True)


def _check_groups(what: str, rank: int, groups: int, width: int, layer: int) -> None:
    if rank % FILTERS_PER_GROUP or groups <= 0 or width % groups:
        raise ValueError(f"ResNeXt's grouped bases hold {FILTERS_PER_GROUP} filters per group, so {what} must be a "
                         f"positive multiple of {FILTERS_PER_GROUP} whose group count divides the conv's input width "
                         f"(layer {layer}: {rank} filters in {groups} groups over {width} channels)")


class ResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs, plain or with one shared grouped basis per layer.

    Args:
        layers: blocks per layer, e.g. ``(3, 4, 6, 3)``.
        num_classes: classifier outputs.
        cardinality: groups of the plain 3x3 convs (32).
        base_width: channels per group at layer 1 (4): inner width is ``planes * base_width / 64 * cardinality``.
        shared_rank: filters of layer 1's shared basis (``s``; layer g has ``s * 2^(g-1)`` in ``s / 4`` groups);
            None builds the plain ResNeXt.
        unique_rank: filters of layer 1's unique bases (``u``; layer g has ``u * 2^(g-1)`` in ``u * 2^(g-1) / 4``
            groups).

    Raises:
        ValueError: ranks that cannot form groups of 4 filters dividing the input width.
    """

    def __init__(self, layers: Sequence[int], num_classes: int, *, cardinality: int = 32, base_width: int = 4,
                 shared_rank: Optional[int] = None, unique_rank: int = 0) -> None:
        super().__init__()
        self.shared = shared_rank is not None
        self.num_layers = len(layers)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for g, blocks in enumerate(layers, 1):
            planes = 64 * 2 ** (g - 1)
            k = planes // 64
            width = int(planes * base_width / 64) * cardinality
            basis = None
            if self.shared:
                _check_groups("shared_rank", shared_rank, shared_rank // FILTERS_PER_GROUP, width, g)
                _check_groups("unique_rank", unique_rank * k, unique_rank * k // FILTERS_PER_GROUP, width, g)
                # The shared basis has s*k filters but s/4 groups in every layer (4k filters per group).
                basis = make_shared_basis(width, shared_rank * k, groups=shared_rank // FILTERS_PER_GROUP)
                setattr(self, f"shared_basis_{g}", basis)
            group = [Bottleneck(in_channels, planes, width, cardinality, stride=1 if g == 1 else 2)]
            in_channels = planes * EXPANSION
            for _ in range(1, blocks):
                group.append(Bottleneck(in_channels, planes, width, cardinality) if basis is None
                             else SharedBottleneck(planes, width, unique_rank * k, basis))
            setattr(self, f"layer{g}", nn.Sequential(*group))
        self.linear = nn.Linear(in_channels, num_classes)
        if self.shared:
            with torch.no_grad():
                for g in range(1, self.num_layers + 1):  # each basis separately, in layer order
                    nn.init.orthogonal_(getattr(self, f"shared_basis_{g}").weight)

    def basis_groups(self) -> list["BasisGroup"]:
        """Per layer: the shared basis and the unique bases of its shared blocks. The unique filters span a different
        input space (``width / groups`` channels) than the shared ones, so only the shared-only regulariser form
        (the one the authors use for CIFAR-100) applies to ResNeXt."""
        from .regularizer import BasisGroup
        if not self.shared:
            return []
        return [BasisGroup(shared=[getattr(self, f"shared_basis_{g}").weight],
                           unique=[b.basis_conv2.weight for b in getattr(self, f"layer{g}")
                                   if isinstance(b, SharedBottleneck)])
                for g in range(1, self.num_layers + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        for g in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{g}")(x)
        x = F.avg_pool2d(x, 4)  # the authors' fixed 4x4 pooling: a 32x32 input ends at 4x4
        return self.linear(torch.flatten(x, 1))


_RESNEXT50 = (3, 4, 6, 3)


@register_model("cifar100", "ResNext50")
def _resnext50(num_classes: int) -> ResNeXt:
    return ResNeXt(_RESNEXT50, num_classes)


@register_model("cifar100", "ResNext50_SingleShared", rank_args=("shared_rank", "unique_rank"),
                rank_multiple=FILTERS_PER_GROUP, shared_rank=64, unique_rank=4)
def _resnext50_single_shared(num_classes: int, shared_rank: int, unique_rank: int) -> ResNeXt:
    return ResNeXt(_RESNEXT50, num_classes, shared_rank=shared_rank, unique_rank=unique_rank)
