"""Datasets and loaders for CIFAR-10, CIFAR-100 and ILSVRC2012 (paper: "Learning Deeply Shared Filter Bases for
Efficient ConvNets"; recipes in SPEC section 5).

Two CIFAR pipelines draw batches from the same distribution:

* ``torch.utils.data.DataLoader`` over :class:`CifarDataset` with the reference's torchvision transforms
  (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``); used on CPU.
* :class:`GpuCifarLoader`: the uint8 images are uploaded to the device once and every batch is cropped, flipped and
  normalised with a few batched tensor ops (after airbench's ``CifarLoader``); the default when training on CUDA.

CIFAR files are read by our own code (:func:`load_cifar`) because torchvision's ``CIFAR10`` rejects batches whose md5
differs from the official archive (re-packed or subset files; SPEC section 10 item 14). ILSVRC2012 uses
``ImageFolder`` trees. :func:`build_loaders` is the one entry point for the scripts.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler, Subset, \
    TensorDataset

__all__ = [
    "DatasetError", "MEAN_STD", "CIFAR_URLS", "DATASETS", "load_cifar", "CifarDataset", "cifar_transforms",
    "imagenet_transforms", "random_crop_flip", "normalize", "GpuCifarLoader", "EpochDataLoader",
    "EpochDistributedSampler", "VAL_SPLIT_SEED", "val_split_indices", "RunLoaders", "build_run_loaders",
    "build_imagefolder", "build_loaders",
]

Device = Union[str, torch.device]

DATASETS = ("cifar10", "cifar100", "ilsvrc")

# Per-channel mean / std of ToTensor()-scaled images (SPEC section 5).
MEAN_STD = {
    # ImageNet statistics, not CIFAR-10's own: the reference trained (and published) its CIFAR-10 checkpoints with
    # these (SPEC section 10 item 1); kept so that those checkpoints evaluate at their reported accuracy.
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "ilsvrc": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

# On-disk layout of the official python-pickle archives: (directory, train files, test files, label key, classes).
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}


class DatasetError(Exception):
    """A dataset that is missing or unreadable; the one-line message says which file and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# CIFAR files
# --------------------------------------------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays/scalars: a CIFAR batch needs nothing else, and an arbitrary pickle
    could run code (the same stance as ``torch.load(weights_only=True)`` in ``utils/checkpoint.py``)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"), ("builtins", "bytearray"),   # how protocol-2/5 pickles written by python 3 carry bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_file(path: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (uint8 [N, 3072] rows in CHW order, int64 [N] labels); DatasetError naming the file."""
    what = f"CIFAR file {path!r}"
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # not a pickle, truncated, disallowed global, unreadable
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise DatasetError(f"{what} is not a readable CIFAR python-pickle batch ({type(e).__name__}: {detail}); "
                           f"replace it with the file from the official archive") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{what} holds a {type(obj).__name__}, expected a dict with keys 'data' and "
                           f"{label_key!r}; replace it with the file from the official archive")
    # Official files are python-2 pickles whose keys decode to str under latin1; re-packs may use bytes keys.
    obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in ("data", label_key) if k not in obj]
    if missing:
        raise DatasetError(f"{what} lacks key(s) {missing} (has {sorted(map(str, obj))}); "
                           f"is it from the other CIFAR dataset? Replace it with the file from the official archive")
    try:
        data = np.asarray(obj["data"])
        labels = np.asarray(obj[label_key])
    except Exception as e:
        raise DatasetError(f"{what}: 'data'/{label_key!r} are not arrays ({type(e).__name__})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not np.issubdtype(data.dtype, np.integer):
        raise DatasetError(f"{what}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 [N, 3072]")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DatasetError(f"{what}: 'data' values outside 0..255")
        data = data.astype(np.uint8)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not (
            labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(f"{what}: {label_key!r} has shape {tuple(labels.shape)} ({labels.dtype}), "
                           f"expected {data.shape[0]} integer labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{what}: {label_key!r} values span {labels.min()}..{labels.max()}, "
                           f"expected 0..{num_classes - 1}")
    return data, labels.astype(np.int64)


def _try_torchvision_download(root: str, dataset: str) -> Optional[str]:
    """Fetch the official archive with torchvision; None on success, else the reason it failed."""
    try:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        cls(root, train=True, download=True)
        return None
    except Exception as e:  # no network, proxy, disk full, md5 mismatch of the download
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def load_cifar(root: Union[str, os.PathLike], dataset: str, train: bool, *,
               download: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10/100 from the official python-pickle layout, without md5 checks.

    Args:
        root: directory holding ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``) or
            ``cifar-100-python/`` (``train``, ``test``); a trailing slash is fine.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        train: the training split (else the test split).
        download: when *none* of the split's files exist, try once to fetch the official archive with torchvision
            (needs network). Files that exist are never overwritten.

    Returns:
        ``(images, labels)``: ``torch.uint8 [N, 32, 32, 3]`` (HWC, like ``torchvision.datasets.CIFAR10.data``) and
        ``torch.int64 [N]``.

    Raises:
        DatasetError: a file is missing (after the download attempt) or malformed.
    """
    if dataset not in _CIFAR_LAYOUT:
        raise ValueError(f"load_cifar: dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    root = os.fspath(root)
    subdir, train_files, test_files, label_key, num_classes = _CIFAR_LAYOUT[dataset]
    base = os.path.join(root, subdir)
    paths = [os.path.join(base, name) for name in (train_files if train else test_files)]
    missing = [p for p in paths if not os.path.isfile(p)]
    reason = None
    if missing and download and len(missing) == len(paths):
        reason = _try_torchvision_download(root, dataset)
        missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        how = f"automatic download failed ({reason}); " if reason else ""
        raise DatasetError(f"{dataset} file {missing[0]!r} not found: put the python-pickle files "
                           f"{', '.join(train_files + test_files)} in {base + os.sep!r} ({how}download "
                           f"{CIFAR_URLS[dataset]} and extract it into {root!r})")
    parts = [_read_cifar_file(p, label_key, num_classes) for p in paths]
    data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([l for _, l in parts]) if len(parts) > 1 else parts[0][1]
    # Rows are CHW-flattened: [N, 3072] -> [N, 3, 32, 32] -> HWC [N, 32, 32, 3].
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return torch.from_numpy(images), torch.from_numpy(np.ascontiguousarray(labels))


# --------------------------------------------------------------------------------------------------------------------
# CPU (DataLoader) path
# --------------------------------------------------------------------------------------------------------------------

def cifar_transforms(dataset: str, train: bool):
    """The reference's torchvision transforms for CIFAR (SPEC section 5); they take a PIL image."""
    import torchvision.transforms as T
    mean, std = MEAN_STD[dataset]
    ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def imagenet_transforms(train: bool):
    """The reference's ILSVRC transforms: RandomResizedCrop(224) + flip, or Resize(256) + CenterCrop(224)."""
    import torchvision.transforms as T
    mean, std = MEAN_STD["ilsvrc"]
    ops = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else [T.Resize(256), T.CenterCrop(224)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class CifarDataset(Dataset):
    """CIFAR images held in memory as uint8 HWC; items are ``(transform(PIL image), int label)`` as in torchvision.

    Args:
        images: ``uint8 [N, 32, 32, 3]`` from :func:`load_cifar`.
        labels: ``int64 [N]``.
        transform: applied to a ``PIL.Image`` (see :func:`cifar_transforms`); None returns the PIL image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
            raise ValueError(f"CifarDataset: images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"CifarDataset: {labels.shape[0]} labels for {images.shape[0]} images")
        self.images = images.cpu().numpy()
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.labels[index]


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed determined by (seed, epoch, stream); (0, 1) and (1, 0) do not collide as seed+epoch would."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class EpochDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose shuffle is a function of ``(seed, epoch)`` via :func:`_epoch_seed`: with one
    replica it yields exactly ``RandomSampler``'s order for a generator seeded the same way (so 1 process x batch 2b
    and 2 processes x batch b see the same global batches), and every rank draws the same permutation.

    Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the (shuffled) index list, so its ``k``-th batch of ``b``
    together with the other ranks' ``k``-th batches is exactly the single-process batch ``k`` of ``W * b``.

    Args:
        pad: repeat the first indices so that every rank gets ``ceil(N / W)`` samples (training: every rank must run
            the same number of steps); False shards without padding (evaluation: no sample counted twice, ranks may
            differ by one sample).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int = 0,
                 pad: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad = pad
        n = len(dataset)
        if not pad:
            self.total_size = n
            self.num_samples = len(range(rank, n, num_replicas))

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_epoch_seed(self.seed, self.epoch, 0))
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.pad and self.total_size > n:
            indices = (indices * math.ceil(self.total_size / max(n, 1)))[:self.total_size]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


class EpochDataLoader:
    """A ``DataLoader`` with ``set_epoch``: the shuffle order is a function of ``(seed, epoch)`` only, so a resumed run
    sees the same order as an uninterrupted one (the sampler has its own generator, reseeded per epoch).

    Iterating without calling ``set_epoch`` advances the epoch by one after each pass, so orders never repeat by
    accident. Worker seeds (the augmentation RNG in worker processes) are also drawn from ``(seed, epoch)`` (and the
    rank) when the worker pool is created; with ``persistent_workers`` that happens once, at the first epoch iterated,
    so on a resume the *order* is reproduced exactly but the augmentation draws are not. With ``num_workers=0``
    augmentations use the main process's global RNG (seeded by the scripts).

    With ``world_size > 1`` (DistributedDataParallel) the sampler is an :class:`EpochDistributedSampler`: this rank's
    shard of the same per-epoch permutation, padded when shuffling (training), unpadded otherwise (evaluation).

    Attributes:
        loader: the wrapped ``DataLoader``; ``dataset``; ``num_samples`` (``len(dataset)``, over all ranks);
        ``shard_samples`` (what this rank iterates).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._sampler_gen = torch.Generator()
        self._worker_gen = torch.Generator()
        if self.world_size > 1:
            sampler = EpochDistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                              seed=self.seed, pad=shuffle)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=self._sampler_gen)
        else:
            sampler = SequentialSampler(dataset)
        self.sampler = sampler
        self.shard_samples = len(sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, drop_last=drop_last, generator=self._worker_gen,
                                 persistent_workers=num_workers > 0)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the given epoch's (order from ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self._sampler_gen.manual_seed(_epoch_seed(self.seed, self.epoch, 0))
        self._worker_gen.manual_seed(_epoch_seed(self.seed, self.epoch, 1 + self.rank))
        if isinstance(self.sampler, EpochDistributedSampler):
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


# --------------------------------------------------------------------------------------------------------------------
# GPU-resident path
# --------------------------------------------------------------------------------------------------------------------

def _crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Shift each image by (dy[n], dx[n]) with zero fill, then mirror it horizontally where flip[n].

    Output pixel (y, x) of image n is input pixel (y + dy, x' + dx) with x' = W-1-x if flipped else x, or 0 when that
    lies outside the image: exactly ``RandomCrop(pad)`` at offset (dy+pad, dx+pad) followed by a flip. One gather.
    """
    n, c, h, w = images.shape
    dev = images.device
    src_y = torch.arange(h, device=dev).unsqueeze(0) + dy.unsqueeze(1)                       # [N, H]
    xs = torch.arange(w, device=dev).unsqueeze(0)
    src_x = torch.where(flip.unsqueeze(1), (w - 1) - xs, xs) + dx.unsqueeze(1)                # [N, W]
    valid = ((src_y >= 0) & (src_y < h)).unsqueeze(2) & ((src_x >= 0) & (src_x < w)).unsqueeze(1)  # [N, H, W]
    flat = src_y.clamp(0, h - 1).unsqueeze(2) * w + src_x.clamp(0, w - 1).unsqueeze(1)        # [N, H, W]
    out = images.reshape(n, c, h * w).gather(2, flat.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w).masked_fill_(~valid.unsqueeze(1), 0)


def _draw_crop_flip(n: int, pad: int, device: Device, generator: Optional[torch.Generator]):
    """Offsets uniform in [-pad, pad] per axis and a fair coin for the flip, drawn on ``device``."""
    dy = torch.randint(-pad, pad + 1, (n,), device=device, generator=generator)
    dx = torch.randint(-pad, pad + 1, (n,), device=device, generator=generator)
    flip = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
    return dy, dx, flip


def random_crop_flip(images: torch.Tensor, pad: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batched ``RandomCrop(H, padding=pad)`` (zero fill) + ``RandomHorizontalFlip()`` on NCHW images of any dtype.

    Each image gets its own offsets, uniform in ``[-pad, pad]`` independently per axis, and is mirrored with p=0.5,
    the distribution of the torchvision transforms. Zero fill happens in the input's value space, so apply it to raw
    pixels (uint8, or floats before normalisation) to match ``RandomCrop`` on the image. Works on any device.

    Args:
        images: ``[N, C, H, W]`` tensor (not modified).
        pad: maximum shift in pixels.
        generator: RNG for the draws; they are made on the generator's device and moved to ``images.device``
            (pass a generator on the images' device to avoid a host-device copy).
    """
    dev = generator.device if generator is not None else images.device
    dy, dx, flip = _draw_crop_flip(images.shape[0], pad, dev, generator)
    dy, dx, flip = (t.to(images.device) for t in (dy, dx, flip))
    return _crop_flip(images, dy, dx, flip)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std``, the same float ops as ``ToTensor`` + ``Normalize``
    (bit-identical results); mean/std shaped ``[C, 1, 1]``."""
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


class GpuCifarLoader:
    """CIFAR batches from a device-resident uint8 copy, with batched crop/flip and normalisation (airbench-style).

    Per epoch: one permutation plus all crop/flip draws, made on the device by a ``torch.Generator`` seeded from
    ``(seed, epoch)``: reproducible and resumable with :meth:`set_epoch`; with no ``set_epoch`` call the epoch advances
    by one after each pass. Test mode keeps the order and skips augmentation. No Python loop over images and no
    host-device synchronisation per batch. The random streams differ between CPU and CUDA devices.

    Sharding (DistributedDataParallel, ``world_size > 1``): every rank draws the same permutation and crop/flip draws
    (on the CPU, so that ranks on different GPU models agree; one small copy per epoch) and takes positions
    ``rank, rank + W, ...`` of it, padded by wrapping around to ``ceil(N / W)`` per rank in training (equal step counts
    on all ranks), unpadded in test mode (no image counted twice). The ``k``-th batches of all ranks together are the
    single-process batch ``k`` of ``W * batch_size``, with the same augmentation of every image.

    Args:
        images: ``uint8 [N, 32, 32, 3]`` (HWC, from :func:`load_cifar`); copied to ``device`` once as NCHW.
        labels: ``int64 [N]``.
        batch_size: images per batch (per rank); the last batch may be smaller (``drop_last=False``).
        mean, std: per-channel normalisation for ToTensor-scaled pixels (e.g. ``MEAN_STD["cifar100"]``).
        train: shuffle + augment (else fixed order, no augmentation).
        device: where the data lives and batches are produced.
        seed: base seed of the per-epoch generator.
        pad: crop padding (4 in the reference).
        channels_last: yield ``x`` in ``torch.channels_last`` memory format.
        rank, world_size: this process's shard (default: the whole set).

    Yields:
        ``(x float32 [B, 3, 32, 32] normalised, y int64 [B])``, both on ``device``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 mean: Sequence[float], std: Sequence[float], train: bool = True, device: Device = "cpu",
                 seed: int = 0, pad: int = 4, channels_last: bool = False, rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
            raise ValueError(f"GpuCifarLoader: images must be uint8 [N, H, W, 3], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"GpuCifarLoader: {labels.shape[0]} labels for {images.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"GpuCifarLoader: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"GpuCifarLoader: rank {rank} outside 0..{world_size - 1}")
        self.device = torch.device(device)
        self.images = images.to(self.device).permute(0, 3, 1, 2).contiguous()   # [N, 3, H, W] uint8
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.batch_size = int(batch_size)
        self.train = train
        self.seed = int(seed)
        self.pad = int(pad)
        self.channels_last = channels_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.num_samples = self.images.shape[0]
        n, w = self.num_samples, self.world_size
        self.shard_samples = (math.ceil(n / w) if train else len(range(self.rank, n, w))) if w > 1 else n
        self.dataset = TensorDataset(self.images, self.labels)   # len(loader.dataset) == num_samples; no copy

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the given epoch's (order and augmentation from ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.shard_samples / self.batch_size)

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, aug) -> Tuple[torch.Tensor, torch.Tensor]:
        if aug is not None:
            images = _crop_flip(images, *aug)
        x = normalize(images, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def _positions(self) -> Optional[torch.Tensor]:
        """This rank's positions in the epoch's sequence (None: all of it, unsharded)."""
        if self.world_size == 1:
            return None
        total = self.shard_samples * self.world_size if self.train else self.num_samples
        return torch.arange(self.rank, total, self.world_size) % max(self.num_samples, 1)

    def __iter__(self):
        n, bs = self.num_samples, self.batch_size
        pos = self._positions()
        if not self.train:
            if pos is None:
                for s in range(0, n, bs):
                    yield self._batch(self.images[s:s + bs], self.labels[s:s + bs], None)
            else:
                pos = pos.to(self.device)
                for s in range(0, pos.numel(), bs):
                    idx = pos[s:s + bs]
                    yield self._batch(self.images[idx], self.labels[idx], None)
            return
        draw_on = self.device if pos is None else torch.device("cpu")
        g = torch.Generator(device=draw_on)
        g.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        order = torch.randperm(n, device=draw_on, generator=g)
        dy, dx, flip = _draw_crop_flip(n, self.pad, draw_on, g)
        if pos is not None:
            order, dy, dx, flip = (t[pos].to(self.device) for t in (order, dy, dx, flip))
        for s in range(0, order.numel(), bs):
            idx = order[s:s + bs]
            yield self._batch(self.images[idx], self.labels[idx], (dy[s:s + bs], dx[s:s + bs], flip[s:s + bs]))


# --------------------------------------------------------------------------------------------------------------------
# ILSVRC2012
# --------------------------------------------------------------------------------------------------------------------

def build_imagefolder(root: Union[str, os.PathLike], split: str, train: bool):
    """``ImageFolder(<root>/<split>)`` with the ILSVRC transforms; DatasetError if the tree is missing or empty."""
    from torchvision.datasets import ImageFolder
    path = os.path.join(os.fspath(root), split)
    if not os.path.isdir(path):
        raise DatasetError(f"ILSVRC directory {path!r} not found: expected {split}/<class>/<image> folders under "
                           f"{os.fspath(root)!r} (pass the directory holding train/ and val/ as --dataset_path)")
    try:
        return ImageFolder(path, transform=imagenet_transforms(train))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no image files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"ILSVRC directory {path!r} holds no images in class folders ({detail}); "
                           f"expected {split}/<class>/<image>.JPEG (the official val archive is flat: sort it into its 1000 "
                           f"class folders first)") from None


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------

VAL_SPLIT_SEED = 20240229
"""Seed of the held-out validation split (``--val_split``): fixed, independent of ``--seed``, and recorded in the
checkpoints so that a resumed run holds out the same images."""


def val_split_indices(n: int, n_val: int, seed: int = VAL_SPLIT_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, val_indices)``: a random ``n_val`` of ``range(n)`` (a function of ``seed`` only) and the
    rest, both sorted int64 tensors. Raises DatasetError if nothing would be left to train on."""
    if n_val < 0:
        raise ValueError(f"val_split must be >= 0, got {n_val}")
    if n_val >= n:
        raise DatasetError(f"--val_split={n_val} would hold out all {n} training images; use fewer than {n}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class RunLoaders(NamedTuple):
    """What :func:`build_run_loaders` returns: ``val`` is None without a validation split, ``train`` None for eval."""

    train: object
    val: object
    test: object
    num_classes: int


def build_loaders(dataset: str, dataset_path: Union[str, os.PathLike], batch_size: int, *, num_workers: int = 4,
                  device: Device = "cpu", seed: int = 0, gpu_pipeline: Optional[bool] = None,
                  channels_last: bool = False, train: bool = True, download: bool = True):
    """``(train_loader or None, test_loader, num_classes)``: :func:`build_run_loaders` without a validation split and
    without sharding (see there for the arguments)."""
    out = build_run_loaders(dataset, dataset_path, batch_size, num_workers=num_workers, device=device, seed=seed,
                            gpu_pipeline=gpu_pipeline, channels_last=channels_last, train=train, download=download)
    return out.train, out.test, out.num_classes


def build_run_loaders(dataset: str, dataset_path: Union[str, os.PathLike], batch_size: int, *, num_workers: int = 4,
                      device: Device = "cpu", seed: int = 0, gpu_pipeline: Optional[bool] = None,
                      channels_last: bool = False, train: bool = True, download: bool = True, val_split: int = 0,
                      split_seed: int = VAL_SPLIT_SEED, rank: int = 0, world_size: int = 1) -> RunLoaders:
    """Loaders for one dataset, as the training and eval scripts use them.

    Args:
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"ilsvrc"``.
        dataset_path: CIFAR: the directory holding ``cifar-10-batches-py/`` / ``cifar-100-python/``; ILSVRC: the
            directory holding ``train/`` and ``val/``. Trailing slash optional.
        batch_size: train and test batch size *per process* (the reference uses ``--batch_size`` for both);
            ``drop_last=False``.
        num_workers: DataLoader workers (ignored by the GPU-resident path).
        device: where training runs; selects the pipeline and ``pin_memory``.
        seed: base seed of the per-epoch shuffle (and crop/flip draws on the GPU path).
        gpu_pipeline: CIFAR only; None = :class:`GpuCifarLoader` on CUDA, :class:`EpochDataLoader` otherwise.
            True forces the device-resident path (also on CPU), False the DataLoader.
        channels_last: GPU path only: yield channels_last batches.
        train: also build the train loader (False: eval only; train files are not read).
        download: CIFAR: try torchvision's download when no file of a split exists.
        val_split: hold out this many training images (chosen by :func:`val_split_indices` with ``split_seed``) as a
            validation set, served like the test set (test transforms, no augmentation, fixed order); the training
            loader then serves the others. ILSVRC: a subset of ``train/`` with the val transforms.
        rank, world_size: DistributedDataParallel shard of this process (see :class:`EpochDistributedSampler` and
            :class:`GpuCifarLoader`): training shards are padded to equal length, val/test shards are not.

    Returns:
        :class:`RunLoaders` ``(train or None, val or None, test, num_classes)``. Every loader yields ``(x, y)``, has
        ``__len__`` (batches), ``set_epoch(epoch)``, ``num_samples`` (images in the split, all ranks),
        ``shard_samples`` (this rank's) and ``dataset``. DataLoader batches are on the CPU (pinned when ``device`` is
        CUDA: move them with ``non_blocking=True``); GPU-path batches are already on ``device``.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if val_split and not train:
        raise ValueError("val_split needs train=True (the validation images come from the training split)")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    shard = {"rank": rank, "world_size": world_size}
    if dataset == "ilsvrc":
        if gpu_pipeline:
            raise ValueError("gpu_pipeline=True is only available for CIFAR; ILSVRC uses a DataLoader")
        test_set = build_imagefolder(dataset_path, "val", train=False)
        train_loader = val_loader = None
        if train:
            train_set = build_imagefolder(dataset_path, "train", train=True)
            if train_set.classes != test_set.classes:
                raise DatasetError(f"ILSVRC train/ has {len(train_set.classes)} class folders and val/ has "
                                   f"{len(test_set.classes)} (or different names) under {os.fspath(dataset_path)!r}; "
                                   f"labels would not match: give both the same class folders")
            if val_split:
                train_idx, val_idx = val_split_indices(len(train_set), val_split, split_seed)
                held_out = copy.copy(train_set)   # shares the file list; only the transform differs
                held_out.transform = imagenet_transforms(train=False)
                val_loader = EpochDataLoader(Subset(held_out, val_idx.tolist()), batch_size, shuffle=False, seed=seed,
                                             num_workers=num_workers, pin_memory=on_cuda, **shard)
                train_set = Subset(train_set, train_idx.tolist())
            train_loader = EpochDataLoader(train_set, batch_size, shuffle=True, seed=seed, num_workers=num_workers,
                                           pin_memory=on_cuda, **shard)
        test_loader = EpochDataLoader(test_set, batch_size, shuffle=False, seed=seed, num_workers=num_workers,
                                      pin_memory=on_cuda, **shard)
        return RunLoaders(train_loader, val_loader, test_loader, len(test_set.classes))

    num_classes = _CIFAR_LAYOUT[dataset][4]
    mean, std = MEAN_STD[dataset]
    use_gpu_path = on_cuda if gpu_pipeline is None else bool(gpu_pipeline)

    def make(images: torch.Tensor, labels: torch.Tensor, augment: bool):
        if use_gpu_path:
            return GpuCifarLoader(images, labels, batch_size, mean=mean, std=std, train=augment, device=device,
                                  seed=seed, channels_last=channels_last, **shard)
        ds = CifarDataset(images, labels, cifar_transforms(dataset, augment))
        return EpochDataLoader(ds, batch_size, shuffle=augment, seed=seed, num_workers=num_workers,
                               pin_memory=on_cuda, **shard)

    train_loader = val_loader = None
    if train:
        images, labels = load_cifar(dataset_path, dataset, True, download=download)
        if val_split:
            train_idx, val_idx = val_split_indices(images.shape[0], val_split, split_seed)
            val_loader = make(images[val_idx], labels[val_idx], False)
            images, labels = images[train_idx], labels[train_idx]
        train_loader = make(images, labels, True)
    test_loader = make(*load_cifar(dataset_path, dataset, False, download=download), False)
    return RunLoaders(train_loader, val_loader, test_loader, num_classes)
