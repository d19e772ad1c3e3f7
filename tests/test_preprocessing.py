"""Preprocessing against its source, tests/data/SPEC.md section 5 (the authors' ``utils.py``), not against the code:
images whose pixels the test chose go through the loaders the scripts build, and come out as the test computes."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from utils import data as D

# SPEC section 5, "Normalize mean / std": CIFAR-10 takes ImageNet's (SPEC section 10.1), CIFAR-100 its own
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPEC_MEAN_STD = {"cifar10": IMAGENET, "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)), "ilsvrc": IMAGENET}
PAD = 4  # SPEC section 5: RandomCrop 32 with padding 4 (zeros)


def normalized(pixels: np.ndarray, dataset: str) -> torch.Tensor:
    """uint8 HWC -> the CHW tensor of ToTensor + Normalize with SPEC's constants, in float64."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in SPEC_MEAN_STD[dataset])
    return (torch.from_numpy(pixels).permute(2, 0, 1).double() / 255 - mean) / std


def _known_images(n: int, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 [n, height, width, 3], each pixel a function of (image, row, column, channel) with no left-right
    symmetry, so that a crop offset and a flip can be read back off the output."""
    i, y, x, c = np.meshgrid(np.arange(n), np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return ((37 * i + 11 * y + 3 * x * x + 89 * c) % 251 + 2).astype(np.uint8)


def _write_cifar(root, dataset: str, images: np.ndarray) -> str:
    """The official python-pickle layout (SPEC section 5, torchvision's files); image k has label k, and the training
    and test sets both hold the images once (CIFAR-10: all in data_batch_1, the other four empty)."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # HWC -> the official CHW rows
    labels = list(range(len(images)))
    if dataset == "cifar10":
        base, key = os.path.join(root, "cifar-10-batches-py"), "labels"
        files = {"data_batch_1": rows, "test_batch": rows} | {f"data_batch_{i}": rows[:0] for i in range(2, 6)}
    else:
        base, key = os.path.join(root, "cifar-100-python"), "fine_labels"
        files = {"train": rows, "test": rows}
    os.makedirs(base, exist_ok=True)
    for name, part in files.items():
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": part, key: labels[: len(part)]}, f, protocol=2)
    return str(root)


def test_the_normalisation_constants_are_specs():
    assert D.MEAN_STD == SPEC_MEAN_STD


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("gpu_pipeline", [False, True], ids=["dataloader", "tensor_pipeline"])
def test_cifar_eval_pipeline_is_totensor_normalize_with_specs_constants(tmp_path, dataset, gpu_pipeline):
    """SPEC section 5, test: ToTensor, Normalize; the file's pixels come out in file order, normalised."""
    images = _known_images(5)
    root = _write_cifar(tmp_path, dataset, images)
    loaders = D.build_loaders(dataset, root, 5, num_workers=0, gpu_pipeline=gpu_pipeline, train=False, download=False)
    x, y = next(iter(loaders.test))
    assert y.tolist() == [0, 1, 2, 3, 4]
    expected = torch.stack([normalized(img, dataset) for img in images])
    assert x.dtype == torch.float32 and torch.allclose(x.double(), expected, rtol=0, atol=1e-6)


def _crops_and_flips(img: np.ndarray, dataset: str) -> torch.Tensor:
    """Every output RandomCrop(32, padding=4) + RandomHorizontalFlip can give: [(2 PAD + 1)^2 * 2, 3, 32, 32]."""
    padded = np.zeros((32 + 2 * PAD, 32 + 2 * PAD, 3), np.uint8)
    padded[PAD:-PAD, PAD:-PAD] = img
    whole = normalized(padded, dataset).float()
    crops = [whole[:, top : top + 32, left : left + 32] for top in range(2 * PAD + 1) for left in range(2 * PAD + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("gpu_pipeline", [False, True], ids=["dataloader", "tensor_pipeline"])
def test_cifar_train_pipeline_is_zero_padded_crop_and_flip(tmp_path, dataset, gpu_pipeline):
    """SPEC section 5, train: each image is one of its 81 crops of the zero-padded image, flipped or not, then
    normalised; over a seeded order of epochs both flips and the extreme offsets (+-4) occur."""
    images = _known_images(4)
    root = _write_cifar(tmp_path, dataset, images)
    loaders = D.build_loaders(dataset, root, 4, num_workers=0, gpu_pipeline=gpu_pipeline, seed=7, download=False)
    candidates = [_crops_and_flips(img, dataset) for img in images]
    found = []
    for epoch in range(1, 11):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train:
            for xi, label in zip(x, y.tolist()):
                err = (candidates[label] - xi).abs_().amax((1, 2, 3))
                assert err.min() < 1e-5, f"epoch {epoch}: image {label} is no crop/flip of its source"
                found.append(int(err.argmin()))
    assert len(found) == 40
    n = (2 * PAD + 1) ** 2
    flips = {k >= n for k in found}
    offsets = {(k % n // (2 * PAD + 1) - PAD, k % (2 * PAD + 1) - PAD) for k in found}
    assert set(flips) == {False, True}
    assert {max(abs(dy) for dy, _ in offsets), max(abs(dx) for _, dx in offsets)} == {PAD}
    assert len(offsets) > 20


def _save(root, split: str, label: int, name: str, pixels: np.ndarray) -> None:
    folder = os.path.join(root, split, f"n{label:08d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, name))  # PNG: lossless, the pixels are the test's


def _quadrants(height: int, width: int, top: int, left: int) -> np.ndarray:
    """Four flat colours split at row ``top`` and column ``left``."""
    img = np.empty((height, width, 3), np.uint8)
    img[:top, :left], img[:top, left:], img[top:, :left], img[top:, left:] = (
        (10, 200, 90),
        (250, 5, 60),
        (0, 90, 255),
        (128, 128, 128),
    )
    return img


def _ramps(height: int, width: int) -> np.ndarray:
    """Red rises left to right, green top to bottom (0..255), blue is flat 100: a crop's extent and a flip show."""
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = np.rint(np.arange(width) * 255 / (width - 1))[None, :]
    img[..., 1] = np.rint(np.arange(height) * 255 / (height - 1))[:, None]
    img[..., 2] = 100
    return img


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ilsvrc"))
    _save(root, "val", 0, "exact.png", _known_images(1, 256, 300)[0])
    _save(root, "val", 1, "quadrants.png", _quadrants(512, 600, 192, 200))
    for label in (0, 1):
        _save(root, "train", label, "ramps.png", _ramps(300, 400))
    return root


def test_ilsvrc_val_pipeline_is_resize_256_then_center_crop_224(ilsvrc):
    """SPEC section 5, ILSVRC test: Resize 256 (shorter side), CenterCrop 224, ToTensor, Normalize (ImageNet's).
    A 256 x 300 image is not resized: the output is rows 16..239 and columns 38..261 of its pixels, exactly. A
    512 x 600 one is halved to 256 x 300 (aspect kept), so its colour edges at row 192 and column 200 land at rows
    96 - 16 = 80 and columns 100 - 38 = 62 of the output."""
    loaders = D.build_loaders("ilsvrc", ilsvrc, 2, num_workers=0, train=False)
    x, y = next(iter(loaders.test))
    assert y.tolist() == [0, 1] and x.shape == (2, 3, 224, 224)
    exact = normalized(_known_images(1, 256, 300)[0][16:240, 38:262], "ilsvrc")
    assert torch.allclose(x[0].double(), exact, rtol=0, atol=1e-6)
    colours = _quadrants(2, 2, 1, 1)
    for rows, cols, colour in (
        (slice(0, 77), slice(0, 59), colours[0, 0]),
        (slice(0, 77), slice(65, 224), colours[0, 1]),
        (slice(83, 224), slice(0, 59), colours[1, 0]),
        (slice(83, 224), slice(65, 224), colours[1, 1]),
    ):
        patch = x[1, :, rows, cols].double()
        expected = normalized(np.broadcast_to(colour, (*patch.shape[1:], 3)).copy(), "ilsvrc")
        assert torch.allclose(patch, expected, rtol=0, atol=1e-6), (rows, cols)


def test_ilsvrc_train_pipeline_is_random_resized_crop_and_flip(ilsvrc):
    """SPEC section 5, ILSVRC train: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3) + flip, ToTensor,
    Normalize. Read off the ramps: each output's crop covers 8-100% of the image at an aspect in range; over a seeded
    order some crops are small (not a plain resize) and both orientations occur."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in IMAGENET)
    loaders = D.build_loaders("ilsvrc", ilsvrc, 2, num_workers=0, seed=3)
    areas, flips = [], []
    for epoch in range(1, 6):
        loaders.train.set_epoch(epoch)
        for x, _ in loaders.train:
            assert x.shape[1:] == (3, 224, 224)
            for img in x.double() * std + mean:  # back to ToTensor's [0, 1]
                assert torch.allclose(img[2], torch.full_like(img[2], 100 / 255), rtol=0, atol=1e-6)
                red, green = img[0], img[1]
                width = (red.max() - red.min()).item()  # of the image's width, as the ramp spans 0..1 over it
                height = (green.max() - green.min()).item()
                assert 0.9 * 3 / 4 <= (width * 400) / (height * 300) <= 1.1 * 4 / 3, (width, height)
                areas.append(width * height)
                flips.append(bool(red[:, -1].mean() < red[:, 0].mean()))
    assert len(areas) == 10 and min(areas) >= 0.08 * 0.9 and max(areas) <= 1.0
    assert min(areas) < 0.5 and set(flips) == {False, True}
