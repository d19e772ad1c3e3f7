"""CIFAR-10/100 and ILSVRC2012 datasets and loaders (SPEC section 5); :func:`build_loaders` is the entry point.

Order and augmentation are functions of ``(seed, epoch, sample index)`` alone, so batches do not depend on the
number of workers and a run resumed at any step sees the batches an uninterrupted run sees."""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import os
import pickle
import signal
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from models.pretrained import error_line
from models.registry import DATASETS, NUM_CLASSES

PathLike = str | os.PathLike

MEAN_STD = {  # of ToTensor()-scaled images; cifar10 uses ImageNet's, as its published checkpoints need (SPEC 10.1)
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "ilsvrc": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_CIFAR_LAYOUT = {  # dataset: (directory, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels"),
}
VAL_SPLIT_SEED = 20240229  # seed of the --val_split hold-out: independent of --seed, recorded in the checkpoints


class DatasetError(Exception):
    """A dataset that is missing or unreadable; the one-line message says which file and what to do."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; (0, 1) and (1, 0) differ, as ``seed + epoch`` would not."""
    x, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    for p in parts:
        x = ((x ^ (int(p) & mask)) * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 31
    return x & ((1 << 63) - 1)


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays only (torchvision's reader unpickles anything and insists on the official md5)."""

    _ALLOWED = {
        (f"numpy.{c}.{m}", n)
        for c in ("core", "_core")
        for m, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    } | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("builtins", "bytes"),
    }
    _PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles name python-2 modules

    def find_class(self, module: str, name: str):
        module = self._PY2_NAMES.get(module, module)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_file(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (uint8 [N, 3072] CHW rows, int64 [N] labels); DatasetError naming the file."""

    def bad(what: str) -> DatasetError:
        return DatasetError(f"CIFAR file {path!r}{what}; replace it with the file from the official archive")

    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001  (not a pickle, truncated, a refused global, unreadable)
        raise bad(f" is not a readable CIFAR python-pickle batch ({error_line(e)})") from None
    if not isinstance(obj, dict):
        raise bad(f" holds a {type(obj).__name__}, not a dict with 'data' and {label_key!r}")
    obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in ("data", label_key) if k not in obj]
    if missing:
        raise bad(f" lacks key {missing[0]!r} (has {sorted(map(str, obj))}), as the other CIFAR dataset's would")
    data, labels = np.asarray(obj["data"]), np.asarray(obj[label_key])
    if (
        data.ndim != 2
        or data.shape[1] != 3072
        or not np.issubdtype(data.dtype, np.integer)
        or (data.size and (data.min() < 0 or data.max() > 255))
    ):
        raise bad(f": 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 [N, 3072]")
    if (
        labels.shape != data.shape[:1]
        or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))
        or (labels.size and (labels.min() < 0 or labels.max() >= num_classes))
    ):
        raise bad(f": {label_key!r} is not {data.shape[0]} labels in 0..{num_classes - 1}")
    return data.astype(np.uint8), labels.astype(np.int64)


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet (what a download would create), or None."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        top, path = path, os.path.dirname(path)
    return top


def _try_download(root: str, dataset: str) -> str | None:
    """Fetch the official archive with torchvision; None on success, else why it failed. A failed download leaves no
    empty folders behind (the default ``./data/`` stays absent until something is written there)."""
    created = _first_missing(root)
    try:
        import torchvision

        getattr(torchvision.datasets, dataset.upper())(root, train=True, download=True)  # CIFAR10 or CIFAR100
        return None
    except Exception as e:  # noqa: BLE001  (no network, disk full, md5 of the download)
        folder = os.path.abspath(root)
        while created is not None and folder.startswith(created):
            try:
                os.rmdir(folder)  # only empty folders: a partial download stays for the user to see
            except OSError:
                break
            folder = os.path.dirname(folder)
        return error_line(e)


def _holds_files(folder: str, dataset: str) -> bool:
    """Whether ``folder`` holds any of the dataset's batch files."""
    _, train_files, test_files, _ = _CIFAR_LAYOUT[dataset]
    return any(os.path.isfile(os.path.join(folder, name)) for name in train_files + test_files)


def cifar_folder(root: str, dataset: str) -> str:
    """The folder of the batch files: ``<root>/cifar-10-batches-py``, or ``root`` itself when it is that folder (it
    holds the files, or bears the name)."""
    subdir = _CIFAR_LAYOUT[dataset][0]
    nested = os.path.join(root, subdir)
    if _holds_files(nested, dataset):
        return nested
    itself = _holds_files(root, dataset) or os.path.basename(os.path.abspath(root)) == subdir
    return root if itself else nested


def _nearby_root(root: str, dataset: str) -> str | None:
    """A ``--dataset_path`` one level below or above ``root`` whose layout holds the dataset's files, or None."""
    below = []
    if os.path.isdir(root):
        with os.scandir(root) as entries:
            below = sorted(e.path for e in itertools.islice(entries, 1000) if e.is_dir() and e.name[0] != ".")
    above = os.path.dirname(os.path.abspath(root))
    return next((c for c in below + [above] if _holds_files(cifar_folder(c, dataset), dataset)), None)


def load_cifar(root: PathLike, dataset: str, train: bool, *, download: bool = True) -> tuple[torch.Tensor, ...]:
    """``(uint8 [N, 32, 32, 3] HWC images, int64 [N] labels)`` of one split. ``root`` holds ``cifar-10-batches-py/``
    (or is that folder); the archive is downloaded only into a folder that holds none of the dataset's files."""
    if dataset not in _CIFAR_LAYOUT:
        raise ValueError(f"load_cifar: dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    root = os.fspath(root)
    subdir, train_files, test_files, label_key = _CIFAR_LAYOUT[dataset]
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetError(
            f"--dataset_path={root!r} is a file, not a folder: pass the folder that holds {subdir}/ "
            f"(or the {subdir} folder itself)"
        )
    names = train_files if train else test_files
    base = cifar_folder(root, dataset)
    reason = None
    if not _holds_files(base, dataset):
        nearby = _nearby_root(root, dataset)
        if nearby is not None:
            raise DatasetError(
                f"no {dataset} files in {base + os.sep!r}, but {cifar_folder(nearby, dataset) + os.sep!r} "
                f"holds them: did you mean --dataset_path={nearby}?"
            )
        if download:  # the archive unpacks into <parent of base>/cifar-10-batches-py/
            reason = _try_download(os.path.dirname(os.path.abspath(base)), dataset)
            base = cifar_folder(root, dataset)
    paths = [os.path.join(base, name) for name in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        how = f"automatic download failed ({reason}); " if reason else ""
        needed = (
            f"the python-pickle files {', '.join(train_files + test_files)}"
            if train
            else f"the test file {', '.join(test_files)} (all that evaluation reads)"
        )
        raise DatasetError(
            f"{dataset} file {missing[0]!r} not found: put {needed} in {base + os.sep!r} ({how}download "
            f"{CIFAR_URLS[dataset]} and extract it into {os.path.dirname(os.path.abspath(base))!r})"
        )
    parts = [_read_cifar_file(p, label_key, NUM_CLASSES[dataset]) for p in paths]
    data, labels = np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts])
    if not len(labels):  # found before anything is written or trained
        raise DatasetError(f"the {dataset} {'training' if train else 'test'} set under {root!r} holds no images")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> HWC
    return torch.from_numpy(images), torch.from_numpy(labels)


class CifarDataset(Dataset):
    """In-memory uint8 HWC CIFAR images; items are ``(transform(PIL image), label)`` as torchvision's."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.numpy(), labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def cifar_transforms(dataset: str, train: bool):
    """The reference's CIFAR transforms: RandomCrop(32, padding=4) + flip for training, then ToTensor + Normalize."""
    import torchvision.transforms as T

    ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(*MEAN_STD[dataset])])


def imagenet_transforms(train: bool):
    """The reference's ILSVRC transforms: RandomResizedCrop(224) + flip, or Resize(256) + CenterCrop(224)."""
    import torchvision.transforms as T

    ops = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else [T.Resize(256), T.CenterCrop(224)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(*MEAN_STD["ilsvrc"])])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index)`` pairs from position ``start`` on (resumed mid-epoch)."""

    def __init__(self, dataset: Dataset, *, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """Item ``(epoch, i)`` is ``dataset[i]`` under torch seed ``mix_seed(seed, epoch, i)``, whatever the worker."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        # The transforms draw from the CPU generator alone: seed only it (torch.manual_seed would also reseed every CUDA
        # generator, which fork_rng(devices=[]) does not restore), and restore it in the main process.
        with torch.random.fork_rng(devices=[], enabled=get_worker_info() is None):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


class TrainLoader(DataLoader):
    """A training ``DataLoader`` over :class:`SeededSamples` with an :class:`EpochSampler`."""

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch`` from this rank's sample ``start`` on (a mid-epoch resume; any batch size)."""
        self.sampler.set_epoch(int(epoch))
        self.sampler.start = int(start)


def _worker_signals(_: int) -> None:
    """Workers leave the first Ctrl-C/SIGTERM to the main process, which stops them cleanly; a second ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a hung-up terminal's group: the main process stops them too
    signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    hook = sys.excepthook  # multiprocessing's batch-handover thread reports a main process that hung up mid-batch
    sys.excepthook = lambda kind, *rest: None if issubclass(kind, (EOFError, ConnectionError)) else hook(kind, *rest)


def _eval_loader(dataset: Dataset, batch_size: int, workers: int, pin: bool, rank: int, world: int) -> DataLoader:
    """File order; under DDP this rank's unpadded shard (no image counted twice)."""
    if world > 1:
        whole = len(dataset)
        dataset = Subset(dataset, range(rank, whole, world))
        dataset.whole = whole
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_worker_signals,
    )


def images_in(loader) -> int:
    """Images of the loader's whole split (every rank's shard together)."""
    return getattr(loader.dataset, "whole", len(loader.dataset))


def val_split_indices(n: int, n_val: int, seed: int = VAL_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, val_indices)``: a random ``n_val`` of ``range(n)`` (a function of ``seed`` only), sorted."""
    if n_val >= n:
        raise DatasetError(f"--val_split={n_val} would hold out all {n} training images; use fewer than {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


Loaders = collections.namedtuple("Loaders", "train val test num_classes")  # train/val None: evaluation/no hold-out


def _read_image(path: str):
    """An RGB PIL image, or a one-line DatasetError naming a corrupt, truncated or non-image file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # unreadable, truncated, unknown
        # formats, and images past PIL's pixel limit (a guard against decompression bombs: it stays on)
        raise DatasetError(f"image {path!r} cannot be read ({error_line(e)}); replace or remove it") from None


def _visible(name: str) -> bool:
    return not name.startswith(".")


class VisibleImageFolder(ImageFolder):
    """``ImageFolder`` without hidden folders and files (``.ipynb_checkpoints/``, macOS ``._*``): no class, no image."""

    def find_classes(self, directory: str) -> tuple[list, dict]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and _visible(e.name))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory!r}")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list:
        def wanted(path: str) -> bool:
            if not all(map(_visible, os.path.relpath(path, directory).split(os.sep))):
                return False
            return is_valid_file(path) if is_valid_file else has_file_allowed_extension(path, extensions)

        return ImageFolder.make_dataset(directory, class_to_idx, None, wanted, allow_empty)


def _imagefolder(root: PathLike, train: bool):
    split = "train" if train else "val"
    path = os.path.join(os.fspath(root), split)
    if not os.path.isdir(path):
        raise DatasetError(
            f"ILSVRC directory {path!r} not found: expected {split}/<class>/<image> folders under "
            f"{os.fspath(root)!r} (pass the directory holding train/ and val/ as --dataset_path)"
        )
    try:
        return VisibleImageFolder(path, transform=imagenet_transforms(train), loader=_read_image)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no image files
        raise DatasetError(
            f"ILSVRC directory {path!r} holds no images in class folders ({error_line(e)}); expected "
            f"{split}/<class>/<image>.JPEG (sort the official flat val archive into class folders "
            f"first)"
        ) from None


def _datasets(dataset: str, root: PathLike, train: bool, val_split: int, split_seed: int, download: bool):
    """``(train, val, test)`` datasets (CIFAR: ``(images, labels)`` tensor pairs), None for the parts not asked for."""
    ilsvrc = dataset == "ilsvrc"
    read = (
        functools.partial(_imagefolder, root)
        if ilsvrc
        else functools.partial(load_cifar, root, dataset, download=download)
    )
    if not train:
        return None, None, read(train=False)
    train_set = read(train=True)  # first: a missing dataset is reported with all of its files, not the test one only
    test = read(train=False)
    if ilsvrc and train_set.classes != test.classes:
        raise DatasetError(
            f"ILSVRC train/ has {len(train_set.classes)} class folders and val/ has "
            f"{len(test.classes)} (or other names) under {os.fspath(root)!r}: give both the same "
            f"class folders"
        )
    if not val_split:
        return train_set, None, test
    train_idx, val_idx = val_split_indices(len(train_set) if ilsvrc else len(train_set[1]), val_split, split_seed)
    if not ilsvrc:
        return tuple(t[train_idx] for t in train_set), tuple(t[val_idx] for t in train_set), test
    held_out = copy.copy(train_set)  # shares the file list; only the transform differs
    held_out.transform = imagenet_transforms(train=False)
    return Subset(train_set, train_idx.tolist()), Subset(held_out, val_idx.tolist()), test


def build_loaders(
    dataset: str,
    dataset_path: PathLike,
    batch_size: int,
    *,
    num_workers: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    gpu_pipeline: bool | None = None,
    channels_last: bool = False,
    train: bool = True,
    download: bool = True,
    val_split: int = 0,
    split_seed: int = VAL_SPLIT_SEED,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """The loaders of one dataset, as the scripts use them; each yields ``(x, y)``, training ones have set_epoch.
    ``batch_size`` is per process; ``device`` selects pin_memory and, for CIFAR with ``gpu_pipeline`` None, the
    GPU-resident pipeline on CUDA; ``train=False`` reads no training files; ``val_split`` holds out that many
    training images (fixed by ``split_seed``); DDP training shards are padded to equal length, val/test ones not."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "ilsvrc" and gpu_pipeline:
        raise ValueError("gpu_pipeline=True is only available for CIFAR; ILSVRC uses a DataLoader")
    device = torch.device(device)
    parts = _datasets(dataset, dataset_path, train, val_split, split_seed, download)
    on_gpu = dataset != "ilsvrc" and (device.type == "cuda" if gpu_pipeline is None else gpu_pipeline)

    def make(part, augment: bool):
        if part is None:
            return None
        if on_gpu:
            from utils.gpu_loader import GpuCifarLoader

            return GpuCifarLoader(
                *part,
                batch_size,
                mean=MEAN_STD[dataset][0],
                std=MEAN_STD[dataset][1],
                train=augment,
                device=device,
                seed=seed,
                channels_last=channels_last,
                rank=rank,
                world_size=world_size,
            )
        if dataset != "ilsvrc":
            part = CifarDataset(*part, cifar_transforms(dataset, augment))
        if not augment:
            return _eval_loader(part, batch_size, num_workers, device.type == "cuda", rank, world_size)
        return TrainLoader(
            SeededSamples(part, seed),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            sampler=EpochSampler(part, seed=seed, rank=rank, world_size=world_size),
            worker_init_fn=_worker_signals,
        )

    classes = len(parts[2].classes) if dataset == "ilsvrc" else NUM_CLASSES[dataset]
    return Loaders(make(parts[0], True), make(parts[1], False), make(parts[2], False), classes)
