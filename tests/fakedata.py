"""Small synthetic datasets in the real on-disk formats, for tests and end-to-end smoke runs.

``write_fake_cifar`` writes python-pickle batches laid out like the official CIFAR archives (md5s differ, which is
why ``utils.data.load_cifar`` does not check them); ``write_fake_imagefolder`` writes ILSVRC-style ``train/`` and
``val/`` class folders of JPEG/PNG files. Images are learnable: each class has its own colour and coarse pattern, plus
per-image noise, so a short training run beats chance.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

_CIFAR = {
    # dataset: (directory, number of classes)
    "cifar10": ("cifar-10-batches-py", 10),
    "cifar100": ("cifar-100-python", 100),
}


def _class_images(
    labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator, noise: float = 24.0
) -> np.ndarray:
    """uint8 [N, size, size, 3] images: class colour + class 4x4 pattern (upsampled) + Gaussian noise.

    The class templates come from a fixed RNG (not ``rng``) so train and test splits, and different seeds, agree.
    """
    tmpl_rng = np.random.default_rng(12345)
    colours = tmpl_rng.uniform(50, 205, size=(num_classes, 1, 1, 3))
    patterns = tmpl_rng.uniform(-45, 45, size=(num_classes, 4, 4, 3))
    cell = -(-size // 4)
    patterns = np.repeat(np.repeat(patterns, cell, axis=1), cell, axis=2)[:, :size, :size]
    imgs = colours[labels] + patterns[labels] + rng.normal(0, noise, size=(len(labels), size, size, 3))
    return np.clip(np.rint(imgs), 0, 255).astype(np.uint8)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are python-2 pickles


def write_fake_cifar(root: str | os.PathLike, dataset: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Write a fake CIFAR-10/100 in the official python-pickle layout under ``root``; returns the dataset directory.

    CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` (``n_train`` split as evenly as possible), ``test_batch`` and
    ``batches.meta``; keys ``data`` (uint8 [n, 3072], CHW-flattened rows), ``labels`` (list of int), ``filenames``,
    ``batch_label``. CIFAR-100: ``cifar-100-python/train``, ``test`` and ``meta``; keys ``data``, ``fine_labels``,
    ``coarse_labels``, ``filenames``, ``batch_label``. Labels are balanced over the classes and shuffled.
    """
    if dataset not in _CIFAR:
        raise ValueError(f"write_fake_cifar: dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    subdir, num_classes = _CIFAR[dataset]
    base = os.path.join(os.fspath(root), subdir)
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(seed)

    def split(n: int, tag: str):
        labels = _balanced_labels(n, num_classes, rng)
        hwc = _class_images(labels, num_classes, 32, rng)
        data = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(n, 3072))  # HWC -> CHW rows
        names = [f"fake_{tag}_{i:06d}.png" for i in range(n)]
        return data, labels, names

    if dataset == "cifar10":
        data, labels, names = split(n_train, "train")
        for i, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump(
                os.path.join(base, f"data_batch_{i}"),
                {
                    "batch_label": f"training batch {i} of 5",
                    "labels": labels[idx].tolist(),
                    "data": data[idx],
                    "filenames": [names[j] for j in idx],
                },
            )
        data, labels, names = split(n_test, "test")
        _dump(
            os.path.join(base, "test_batch"),
            {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(), "data": data, "filenames": names},
        )
        _dump(
            os.path.join(base, "batches.meta"),
            {
                "num_cases_per_batch": max(1, -(-n_train // 5)),
                "num_vis": 3072,
                "label_names": [f"class{i}" for i in range(num_classes)],
            },
        )
    else:
        for name, n in (("train", n_train), ("test", n_test)):
            data, labels, names = split(n, name)
            _dump(
                os.path.join(base, name),
                {
                    "filenames": names,
                    "batch_label": f"{name}ing batch 1 of 1",
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                    "data": data,
                },
            )
        _dump(
            os.path.join(base, "meta"),
            {
                "fine_label_names": [f"class{i}" for i in range(num_classes)],
                "coarse_label_names": [f"superclass{i}" for i in range(20)],
            },
        )
    return base


def write_fake_imagefolder(
    root: str | os.PathLike, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0
) -> str:
    """Write ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.png`` (``per_class`` images of ``size`` px per
    class and split; ILSVRC-like synset folder names ``n00000000``...); returns ``root``."""
    from PIL import Image

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    for split, ext in (("train", "JPEG"), ("val", "png")):
        labels = np.repeat(np.arange(classes), per_class)
        imgs = _class_images(labels, classes, size, rng)
        for k, (label, img) in enumerate(zip(labels, imgs)):
            d = os.path.join(root, split, f"n{label:08d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{split}_{k:05d}.{ext}"))
    return root
