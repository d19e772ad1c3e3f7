"""MobileNetV2 for CIFAR-100 and ILSVRC, plain and with shared expansion convs (paper section 4.3; SPEC 2.6, 4).

One class builds every model from :data:`STAGES` and a :class:`MobileNetV2Cfg` (what the authors' two files do
differently). Blocks use functional ReLUs (not ReLU6) and the pool is functional: ptflops counts only stem and head
ReLU6s. ``MobileNetV2_Shared`` gives stages 3-6 one 1x1 expansion conv each (``shared_basis_1..4``, [6c, c, 1, 1]) that
blocks 2..n call instead of their own ``conv1``, keeping their own ``bn1``: no unique part, no ranks, PyTorch default
init. The bases have more filters than inputs (192 x 32 ... 960 x 160): the orthogonality penalty has a positive floor.
``MobileNetV2_SharedDouble`` (README "Shared++", SPEC_v2 section 3) shares the 1x1 projection conv too
(``shared_basis_{g}_1``/``_2``); on ILSVRC its shared blocks add ECA channel attention after ``bn3`` (the authors' code
since April 2021; ``MobileNetV2_SharedDouble_NoECA`` is the November 2020 layout the README's result dates from).

Attribute names are checkpoint keys and construction order is the authors' (``pre``, stages with each shared conv
built just before its stage, ``conv1``, head), so ``torch.manual_seed`` reproduces their initial weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisCfg, register_bases, require_basis, share_bases, shared_bases_of
from .folding import fold_conv_bn
from .registry import register_model

# (expansion t, output channels c, blocks n, first-block stride s) per stage; stage 6's stride comes from the cfg.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, None), (6, 320, 1, 1))
SHARED_STAGES = (3, 4, 5, 6)  # 1-based stages that get a shared expansion conv (shared_basis_1..4)


@dataclass(frozen=True)
class MobileNetV2Cfg:
    """What differs between the authors' CIFAR-100 and ILSVRC MobileNetV2."""

    stem: tuple  # (kernel, stride, padding) of the stem conv ``pre.0`` (3 -> 32, with bias)
    stage6_stride: int
    # True: every stride-1 block is residual, with a 1x1 conv + BN ``shortcut`` where channels change (CIFAR);
    # False: only stride-1 blocks with in = out are, with the identity (ILSVRC).
    projection_shortcuts: bool
    conv_head: bool  # classify with a 1x1 conv ``conv2`` (bias) after the pool, not Dropout(0.2) + ``classifier.1``


# CIFAR's 1x1 stem has padding 1, so a 32x32 input becomes 34x34.
CIFAR = MobileNetV2Cfg(stem=(1, 1, 1), stage6_stride=1, projection_shortcuts=True, conv_head=True)
ILSVRC = MobileNetV2Cfg(stem=(3, 2, 1), stage6_stride=2, projection_shortcuts=False, conv_head=False)


class ECA(nn.Module):
    """Efficient channel attention as the authors' ``eca_layer``: scale each channel by sigmoid(1-D conv, kernel
    ``k``, over the channel axis of the globally pooled input); the pool is a module (ptflops counts it)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.avg_pool(x).squeeze(-1).transpose(-1, -2))  # (N, 1, C)
        return x * torch.sigmoid(y.transpose(-1, -2).unsqueeze(-1))


class InvertedResidual(nn.Module):
    """Expand 1x1 ``conv1`` -> bn1 -> ReLU -> depthwise 3x3 ``conv2`` -> bn2 -> ReLU -> project 1x1 ``conv3`` -> bn3,
    plus the residual chosen by ``projection_shortcuts``. ``shared``: the stage's 1x1 convs in place of ``conv1`` (and
    ``conv3``), keys ``shared_basis1`` (``2``); ``attention``: an :class:`ECA` kernel size after ``bn3`` (0: none)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expansion: int,
        stride: int,
        projection_shortcuts: bool,
        shared: Sequence[nn.Conv2d] = (),
        attention: int = 0,
    ) -> None:
        super().__init__()
        planes = expansion * in_channels
        self.shortcut: nn.Module | None = None  # identity when residual
        share_bases(self, shared, keys=[f"shared_basis{j}" for j in range(1, len(shared) + 1)])
        if not shared:
            self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if len(shared) < 2:
            self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and (projection_shortcuts or in_channels == out_channels)
        if self.residual and in_channels != out_channels:  # projection_shortcuts only
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.chan_attention = ECA(attention) if attention else None

    def _convs(self) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
        """The expansion, depthwise and projection convs, the block's own or shared."""
        shared = shared_bases_of(self)
        return (shared[0] if shared else self.conv1), self.conv2, (shared[1] if len(shared) > 1 else self.conv3)

    def folded(self) -> FoldedInvertedResidual:
        return FoldedInvertedResidual(self).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expand, depthwise, project = self._convs()
        out = F.relu(self.bn1(expand(x)), inplace=True)
        out = F.relu(self.bn2(depthwise(out)), inplace=True)
        out = self.bn3(project(out))
        if self.chan_attention is not None:
            out = self.chan_attention(out)
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


class FoldedInvertedResidual(nn.Module):
    """Eval-only equivalent of an :class:`InvertedResidual` ``block``: 1x1 ``conv1`` -> ReLU -> depthwise ``conv2`` ->
    ReLU -> 1x1 ``conv3`` (-> attention) (+ residual), each with its BN folded in (a shared conv becomes its own)."""

    def __init__(self, block: InvertedResidual) -> None:
        super().__init__()
        bns = (block.bn1, block.bn2, block.bn3)
        self.conv1, self.conv2, self.conv3 = (fold_conv_bn(conv, bn) for conv, bn in zip(block._convs(), bns))
        self.residual, self.shortcut = block.residual, None if block.shortcut is None else fold_conv_bn(*block.shortcut)
        self.chan_attention = block.chan_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(self.conv2(out), inplace=True)
        out = self.conv3(out)
        if self.chan_attention is not None:
            out = self.chan_attention(out)
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) in the authors' layout ``cfg`` (:data:`CIFAR` or :data:`ILSVRC`); ``basis``: None
    (plain), ``BasisCfg()`` (``_Shared``) or ``BasisCfg(2)`` (``_SharedDouble``, with ECA if ``eca``)."""

    def __init__(
        self, cfg: MobileNetV2Cfg, num_classes: int, *, basis: BasisCfg | None = None, eca: bool = False
    ) -> None:
        super().__init__()
        self.arch = cfg
        self.basis_cfg = require_basis(basis, "MobileNetV2", counts=(1, 2), fixed_size=True)
        self.bases_by_position = basis is not None and basis.bases_per_group == 2  # SharedDouble's regulariser form
        self.pre = nn.Sequential(nn.Conv2d(3, 32, *cfg.stem), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        in_channels = 32
        for i, (t, c, n, s) in enumerate(STAGES, 1):
            stride = cfg.stage6_stride if s is None else s
            shared = []
            if basis is not None and i in SHARED_STAGES:
                shared = [nn.Conv2d(c, t * c, 1, bias=False)]  # the expansion conv of blocks 2..n
                if basis.bases_per_group == 2:
                    shared.append(nn.Conv2d(t * c, c, 1, bias=False))  # and their projection conv
                register_bases(self, shared, f"shared_basis_{SHARED_STAGES.index(i) + 1}")
            blocks = [InvertedResidual(in_channels, c, t, stride, cfg.projection_shortcuts)]
            attention = (1 if c < 96 else 3) if eca and shared else 0  # the authors' ECA kernel: 3 from stage 5 on
            blocks += [InvertedResidual(c, c, t, 1, cfg.projection_shortcuts, shared, attention) for _ in range(1, n)]
            in_channels = c
            # Stages of one block are the block itself in the checkpoints (`stage1.conv1`), the others Sequentials.
            setattr(self, f"stage{i}", blocks[0] if n == 1 else nn.Sequential(*blocks))
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        if cfg.conv_head:
            self.conv2 = nn.Conv2d(1280, num_classes, 1)
        else:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    @torch.no_grad()
    def after_fold(self) -> None:
        """Finish :func:`models.fold`: fold the stem's and head's BNs into their convs too; the BN slots become
        ``nn.Identity``, so ``pre.0``/``conv1.0`` keep their keys (now with a bias)."""
        for seq in (self.pre, self.conv1):
            if isinstance(seq[1], nn.BatchNorm2d):
                seq[0] = fold_conv_bn(seq[0], seq[1])
                seq[1] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for i in range(1, len(STAGES) + 1):
            x = getattr(self, f"stage{i}")(x)
        x = F.adaptive_avg_pool2d(self.conv1(x), 1)  # (N, 1280, 1, 1)
        if self.arch.conv_head:
            return torch.flatten(self.conv2(x), 1)
        return self.classifier(torch.flatten(x, 1))


for _dataset, _arch in (("cifar100", CIFAR), ("ilsvrc", ILSVRC)):
    register_model(_dataset, "MobileNetV2")(partial(MobileNetV2, _arch))
    register_model(_dataset, "MobileNetV2_Shared")(partial(MobileNetV2, _arch))
    register_model(_dataset, "MobileNetV2_SharedDouble")(partial(MobileNetV2, _arch, eca=_arch is ILSVRC))
register_model("ilsvrc", "MobileNetV2_SharedDouble_NoECA")(partial(MobileNetV2, ILSVRC))
