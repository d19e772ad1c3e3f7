"""CIFAR batches from a device-resident uint8 copy: crop, flip and normalise as a few batched tensor ops.

Per-image PIL work dominates a DataLoader CIFAR epoch; here each epoch draws its permutation and all crop/flip
offsets at once from ``(seed, epoch)`` (reproducible, resumable at any step), with the distribution of
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` (tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from utils.data import mix_seed


def _crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``RandomCrop(pad)`` at offset (dy + pad, dx + pad), then a flip where ``flip``, 0 outside: one gather."""
    n, c, h, w = images.shape
    src_y = torch.arange(h, device=images.device).unsqueeze(0) + dy.unsqueeze(1)  # [N, H]
    xs = torch.arange(w, device=images.device).unsqueeze(0)
    src_x = torch.where(flip.unsqueeze(1), (w - 1) - xs, xs) + dx.unsqueeze(1)  # [N, W]
    valid = ((src_y >= 0) & (src_y < h)).unsqueeze(2) & ((src_x >= 0) & (src_x < w)).unsqueeze(1)  # [N, H, W]
    flat = src_y.clamp(0, h - 1).unsqueeze(2) * w + src_x.clamp(0, w - 1).unsqueeze(1)
    out = images.reshape(n, c, h * w).gather(2, flat.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w).masked_fill_(~valid.unsqueeze(1), 0)


def _draw_crop_flip(n: int, pad: int, device, generator: torch.Generator | None):
    """Offsets uniform in [-pad, pad] per axis and a fair coin for the flip."""
    dy, dx = (torch.randint(-pad, pad + 1, (n,), device=device, generator=generator) for _ in range(2))
    return dy, dx, torch.randint(0, 2, (n,), device=device, generator=generator).bool()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std``: the float ops of ToTensor + Normalize, bit for bit."""
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


class GpuCifarLoader:
    """Device-resident loader of uint8 HWC CIFAR ``images``/``labels``; ``train`` shuffles and augments. Under DDP
    all ranks draw the same permutation and offsets (on the CPU, so GPU models agree) and take positions ``rank,
    rank + W, ...``: their ``k``-th batches together are single-process batch ``k`` of ``W * batch_size``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = True,
        device="cpu",
        seed: int = 0,
        pad: int = 4,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.device = torch.device(device)
        self.images = images.to(self.device).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
        self.labels = labels.to(self.device, torch.int64)
        self.mean, self.std = (
            torch.tensor(v, dtype=torch.float32, device=self.device).view(-1, 1, 1) for v in (mean, std)
        )
        self.batch_size, self.train, self.seed, self.pad = int(batch_size), train, int(seed), int(pad)
        self.channels_last, self.rank, self.world_size = channels_last, int(rank), int(world_size)
        self.epoch, self.start = 0, 0  # start: this rank's first sample of the next pass (a mid-epoch resume)
        n, w = self.images.shape[0], self.world_size
        self.shard_samples = (math.ceil(n / w) if train else len(range(self.rank, n, w))) if w > 1 else n
        self.dataset = TensorDataset(self.images, self.labels)  # len(loader.dataset) == N; no copy

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return math.ceil((self.shard_samples - (self.start if self.train else 0)) / self.batch_size)

    def __iter__(self):
        n, bs, w = self.images.shape[0], self.batch_size, self.world_size
        pos = None if w == 1 else torch.arange(self.rank, self.shard_samples * w if self.train else n, w) % n
        draw_on = self.device if pos is None else torch.device("cpu")
        order, start, aug = torch.arange(n, device=draw_on), 0, ()  # aug: (dy, dx, flip) when training
        if self.train:
            g = torch.Generator(device=draw_on).manual_seed(mix_seed(self.seed, self.epoch))
            order, aug = torch.randperm(n, device=draw_on, generator=g), _draw_crop_flip(n, self.pad, draw_on, g)
            start, self.start = self.start, 0
            self.epoch += 1  # a pass without set_epoch is the next epoch's
        if pos is not None:
            order, aug = order[pos].to(self.device), tuple(t[pos].to(self.device) for t in aug)
        for s in range(start, order.numel(), bs):
            idx = order[s : s + bs]
            x = _crop_flip(self.images[idx], *(t[s : s + bs] for t in aug)) if aug else self.images[idx]
            x = normalize(x, self.mean, self.std)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), self.labels[idx]
