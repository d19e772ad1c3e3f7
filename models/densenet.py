"""DenseNet-BC 121 for CIFAR-100, plain and with shared filter bases (paper section 4.2; SPEC sections 2.4, 4).

Each bottleneck's 3x3 conv is factorised over one of four network-level bases, with the authors' code's quirks:

* **Every** bottleneck is shared (no plain first layer, unlike the ResNets) and ranks are not scaled per block: all
  bases are ``[s, 128, 3, 3]`` (the bottleneck width is ``4 * growth`` everywhere).
* The last dense block uses ``shared_basis_3`` (the authors' loop index leaked), so ``shared_basis_4`` is never called
  in forward, yet it is counted, in the state_dict and regularised (SPEC 2.4 and 10.2).
* The last dense block is ``features.dense_block3`` in the plain model, ``features.dense_block_layer_3`` in the shared.
* Construction order is the authors' (``conv1``, the four bases, the features, ``linear``), so ``torch.manual_seed``
  reproduces their initial weights: PyTorch defaults, and the bases are *not* orthogonal at init (SPEC section 3).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basis import BasisCfg, BasisPosition, basis_conv2d, make_shared_basis, require_basis, share_bases
from .folding import fold_factorised
from .registry import register_model


class Transition(nn.Module):
    """BN -> 1x1 conv -> 2x2 average pool (no ReLU, as in the authors' code). Keys ``down_sample.{0,1}``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down_sample = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_sample(x)


class DenseLayer(nn.Module):
    """Plain DenseNet-BC layer: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv; output ``[x, new]``. The ReLUs are
    modules (keys ``residual_function.{0,2,3,5}``), so the FLOP counter counts them, as ptflops did."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.residual_function = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.residual_function(x)), 1)


class SharedDenseLayer(nn.Module):
    """DenseNet-BC layer whose 3x3 conv is factorised over the dense block's ``shared_basis`` and ``unique_rank`` own
    filters: bn0 -> ReLU -> 1x1 conv1 -> bn1 -> ReLU -> [basis_conv2 || shared_basis] -> basis_bn2 -> 1x1 coeff_conv2;
    output ``[x, new]``. Functional ReLUs (not counted by ptflops)."""

    def __init__(self, in_channels: int, growth_rate: int, unique_rank: int, shared_basis: nn.Conv2d) -> None:
        super().__init__()
        inner = 4 * growth_rate
        rank = unique_rank + shared_basis.out_channels
        self.fused = True
        share_bases(self, [shared_basis])  # first in the checkpoint's key order
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.basis_conv2 = nn.Conv2d(inner, unique_rank, 3, padding=1, bias=False) if unique_rank else None
        self.basis_bn2 = nn.BatchNorm2d(rank)
        self.coeff_conv2 = nn.Conv2d(rank, growth_rate, 1, bias=False)

    def basis_positions(self) -> list[BasisPosition]:
        return [BasisPosition(self.basis_conv2, self.shared_basis, self.basis_bn2, self.coeff_conv2)]

    @torch.no_grad()
    def folded(self, dense: bool | None = None) -> nn.Module:
        """The eval-mode layer without basis BN, its last conv with a bias (for :meth:`DenseNet.after_fold`): a plain
        :class:`DenseLayer` (``dense=True``), a :class:`FoldedSharedDenseLayer` (``False``) or the fewer MACs (``None``:
        36,864 vs 1,184*r per pixel: S16U1, r = 17, stays factorised; S64U4, r = 68, becomes a plain DenseNet)."""
        conv, _ = fold_factorised(self.basis_positions()[0], dense, keep_bias=True)
        if isinstance(conv, nn.Sequential):  # factorised: basis conv + coefficient conv with the bias
            return FoldedSharedDenseLayer(self, conv[0], conv[1]).eval()
        block = DenseLayer(self.bn0.num_features, conv.out_channels).to(conv.weight.device, conv.weight.dtype)
        f = block.residual_function
        f[0].load_state_dict(self.bn0.state_dict())
        f[2].weight.copy_(self.conv1.weight)
        f[3].load_state_dict(self.bn1.state_dict())
        f[5] = conv
        return block.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn0(x), inplace=True)
        out = F.relu(self.bn1(self.conv1(out)), inplace=True)
        out = basis_conv2d(out, self.basis_conv2, self.shared_basis, fused=self.fused)  # (N, u + s, H, W)
        out = self.coeff_conv2(self.basis_bn2(out))
        return torch.cat((x, out), 1)


class FoldedSharedDenseLayer(nn.Module):
    """Eval-only low-rank :class:`SharedDenseLayer`: its ``basis_conv2`` is the layer's own copy of the ``[unique ||
    shared]`` filters, ``coeff_conv2`` has the basis BN folded in."""

    def __init__(self, layer: SharedDenseLayer, basis_conv2: nn.Conv2d, coeff_conv2: nn.Conv2d) -> None:
        super().__init__()
        self.bn0, self.conv1, self.bn1 = copy.deepcopy((layer.bn0, layer.conv1, layer.bn1))
        self.basis_conv2, self.coeff_conv2 = basis_conv2, coeff_conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn0(x), inplace=True)
        out = F.relu(self.bn1(self.conv1(out)), inplace=True)
        return torch.cat((x, self.coeff_conv2(self.basis_conv2(out))), 1)


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs (``layers``: bottlenecks per dense block), plain (``basis=None``) or with one
    shared basis per dense block; transitions keep ``floor(reduction * C)`` channels."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int,
        *,
        growth_rate: int = 32,
        reduction: float = 0.5,
        basis: BasisCfg | None = None,
    ) -> None:
        super().__init__()
        self.basis_cfg = require_basis(basis, "DenseNet")
        self.num_blocks = len(layers)
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.features = nn.Sequential()  # registered before the bases: its keys come first in the state_dict
        if basis is not None:  # one basis per dense block, built before the blocks as in the authors' code (RNG order)
            for g in range(1, len(layers) + 1):
                setattr(self, f"shared_basis_{g}", make_shared_basis(4 * growth_rate, basis.shared_rank))
        for i, n in enumerate(layers):
            block = nn.Sequential()
            # Checkpoint quirk: the last dense block gets shared_basis_3, leaving shared_basis_4 unused in forward.
            shared = None if basis is None else getattr(self, f"shared_basis_{min(i, len(layers) - 2) + 1}")
            for j in range(n):
                layer = (
                    DenseLayer(channels, growth_rate)
                    if shared is None
                    else SharedDenseLayer(channels, growth_rate, basis.unique_rank, shared)
                )
                block.add_module(f"bottle_neck_layer_{j}", layer)
                channels += growth_rate
            # the authors' two classes name the last dense block differently
            last = "dense_block" if basis is None and i == len(layers) - 1 else "dense_block_layer_"
            self.features.add_module(f"{last}{i}", block)
            if i < len(layers) - 1:
                out_channels = int(reduction * channels)
                self.features.add_module(f"transition_layer_{i}", Transition(channels, out_channels))
                channels = out_channels
        self.features.add_module("bn", nn.BatchNorm2d(channels))
        self.features.add_module("relu", nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(channels, num_classes)

    @torch.no_grad()
    def after_fold(self) -> None:
        """Finish :func:`models.fold`: every reader of a layer's new channels is a BatchNorm, and ``bn(x + b)`` is
        ``bn`` with running mean ``mu - b``, so the biases move into the BNs (walked through the feature stack: a
        channel keeps its index until the next transition). If every layer is now a plain :class:`DenseLayer`, the
        model takes the plain DenseNet's keys too (its last block is renamed ``dense_block3``)."""
        layers = [m for m in self.modules() if isinstance(m, (DenseLayer, FoldedSharedDenseLayer, SharedDenseLayer))]
        if self.basis_cfg is None or any(isinstance(m, SharedDenseLayer) for m in layers):
            return  # plain model, or layers that were not folded: nothing to do
        pending = self.conv1.weight.new_zeros(self.conv1.out_channels)  # bias per channel
        for module in self.features.children():
            if isinstance(module, Transition):
                module.down_sample[0].running_mean.sub_(pending)
                pending = pending.new_zeros(module.down_sample[1].out_channels)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.sub_(pending)
            elif isinstance(module, nn.Sequential):  # a dense block
                for layer in module:
                    plain = isinstance(layer, DenseLayer)
                    (layer.residual_function[0] if plain else layer.bn0).running_mean.sub_(pending)
                    conv = layer.residual_function[5] if plain else layer.coeff_conv2  # makes the new channels
                    bias = conv.bias if conv.bias is not None else pending.new_zeros(conv.out_channels)
                    conv.register_parameter("bias", None)
                    pending = torch.cat((pending, bias))
        if all(isinstance(m, DenseLayer) for m in layers):
            last = self.num_blocks - 1
            names = {f"dense_block_layer_{last}": f"dense_block{last}"}
            self.features = nn.Sequential(OrderedDict((names.get(n, n), m) for n, m in self.features.named_children()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        return self.linear(torch.flatten(self.avgpool(x), 1))


_DENSENET121 = (6, 12, 24, 16)
register_model("cifar100", "DenseNet121")(partial(DenseNet, _DENSENET121, growth_rate=32))
# The paper's row "DenseNet121-S64U4" is this model at shared_rank=16, unique_rank=1 (SPEC section 9).
register_model("cifar100", "DenseNet121_SingleShared", channels=4 * 32)(partial(DenseNet, _DENSENET121, growth_rate=32))
