"""utils/data.py: CIFAR pickle reader, both CIFAR pipelines, ILSVRC folders and build_loaders (CPU, seconds)."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from utils import data as D
from utils import gpu_loader as G

try:  # importable both as a package module and from the tests/ directory (pytest's rootdir-less import mode)
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder


def _read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=103, n_test=37, seed=1)
    write_fake_cifar(root, "cifar100", n_train=211, n_test=50, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    return write_fake_imagefolder(root, classes=3, per_class=4, size=40, seed=0)


# ---------------------------------------------------------------------------------------------- CIFAR file reading


@pytest.mark.parametrize(
    "dataset,files,key",
    [
        ("cifar10", [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)], "labels"),
        ("cifar100", ["cifar-100-python/train"], "fine_labels"),
    ],
)
def test_load_cifar_round_trip(cifar_root, dataset, files, key):
    images, labels = D.load_cifar(cifar_root, dataset, train=True, download=False)
    rows = np.concatenate([_read_pickle(os.path.join(cifar_root, f))["data"] for f in files])
    want = np.concatenate([_read_pickle(os.path.join(cifar_root, f))[key] for f in files])
    assert images.dtype == torch.uint8 and images.shape == (rows.shape[0], 32, 32, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == want.tolist()
    # HWC order vs the CHW-flattened rows: row[c*1024 + y*32 + x] == image[y, x, c]
    n, y, x, c = 5, 7, 19, 2
    assert images[n, y, x, c].item() == rows[n, c * 1024 + y * 32 + x]
    assert torch.equal(images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)).permute(0, 2, 3, 1))
    # subset files: 103 (cifar10) / 211 (cifar100) images instead of 50000
    assert images.shape[0] == (103 if dataset == "cifar10" else 211)


def test_load_cifar_test_split_and_trailing_slash(cifar_root):
    a = D.load_cifar(cifar_root, "cifar10", train=False, download=False)
    b = D.load_cifar(cifar_root + "/", "cifar10", train=False, download=False)
    assert a[0].shape[0] == 37 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(D.load_cifar(cifar_root, "cifar100", train=False, download=False)[1].tolist()) <= set(range(100))


def _one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_dir_raises(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(tmp_path, "cifar10", train=True, download=False)
    msg = _one_line(e)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and D.CIFAR_URLS["cifar10"] in msg


def test_failed_download_reported(tmp_path, monkeypatch):
    import torchvision

    class NoNet:
        def __init__(self, *a, **k):
            raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", NoNet)
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(tmp_path, "cifar100", train=False)
    msg = _one_line(e)
    assert "network unreachable" in msg and "cifar-100-python" in msg and D.CIFAR_URLS["cifar100"] in msg


def test_partial_cifar10_names_missing_file(tmp_path):
    base = write_fake_cifar(tmp_path, "cifar10", 20, 5)
    os.remove(os.path.join(base, "data_batch_4"))
    with pytest.raises(D.DatasetError) as e:  # no download attempt: some files exist
        D.load_cifar(tmp_path, "cifar10", train=True)
    assert "data_batch_4" in _one_line(e)


def test_evaluation_asks_only_for_the_test_file(tmp_path):
    """Issue 27: eval reads only test_batch, so a missing dataset must not send the user after 160 MB of training
    batches; training still names every file."""
    with pytest.raises(D.DatasetError) as e:
        D.build_loaders("cifar10", tmp_path, 8, num_workers=0, train=False, download=False)
    msg = _one_line(e)
    assert "test_batch" in msg and "data_batch" not in msg
    with pytest.raises(D.DatasetError) as e:
        D.build_loaders("cifar10", tmp_path, 8, num_workers=0, download=False)
    msg = _one_line(e)
    assert "data_batch_1" in msg and "test_batch" in msg


def test_dataset_path_one_level_off(tmp_path, monkeypatch):
    """Issue 27: the batch folder itself is accepted; a path one level too shallow or beside the layout says which
    --dataset_path was meant; a file is named as such; no download is tried where the files are near."""
    monkeypatch.setattr(D, "_try_download", lambda root, dataset: pytest.fail(f"download tried into {root}"))
    root = tmp_path / "root"
    batches = write_fake_cifar(root, "cifar10", 20, 5)
    assert D.load_cifar(batches, "cifar10", train=False)[1].shape == (5,)  # <root>/cifar-10-batches-py
    assert D.load_cifar(os.path.join(batches, ""), "cifar10", train=True)[1].shape == (20,)
    for off in (tmp_path, root / "data", os.path.join(batches, "sub")):  # one level up, beside, below the batches
        with pytest.raises(D.DatasetError) as e:
            D.load_cifar(off, "cifar10", train=False)
        want = batches if str(off).startswith(batches) else str(root)
        assert _one_line(e).endswith(f"did you mean --dataset_path={want}?")
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(os.path.join(batches, "test_batch"), "cifar10", train=False)
    assert "is a file, not a folder" in _one_line(e)
    empty = tmp_path / "other" / "cifar-10-batches-py"  # an empty batch folder: the files go into it, not below it
    empty.mkdir(parents=True)
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(empty, "cifar10", train=False, download=False)
    assert f"in {str(empty) + os.sep!r}" in _one_line(e) and "batches-py/cifar-10-batches-py" not in _one_line(e)


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    """Issue 27: a run against the default ./data/ without network must not leave an empty ./data/ behind; an
    existing folder stays. The download is torchvision's own, pointed at a closed loopback port."""
    import socket

    import torchvision

    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar("./data/", "cifar10", train=True)
    assert "automatic download failed" in _one_line(e)
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(D.DatasetError):
        D.load_cifar(tmp_path / "mine" / "a" / "b", "cifar10", train=False)
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []


@pytest.mark.parametrize(
    "payload,fragment",
    [
        (b"this is not a pickle", "not a readable"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}), "lacks key"),
        (pickle.dumps({"data": np.zeros((2, 3, 32, 32), np.uint8), "labels": [0, 1]}), "expected uint8 [N, 3072]"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "is not 2 labels in 0..9"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "is not 2 labels in 0..9"),
        (pickle.dumps([1, 2, 3]), "holds a list"),
        (pickle.dumps({"data": os.getcwd, "labels": []}), "refusing to load global"),
    ],
)
def test_malformed_pickle_raises(tmp_path, payload, fragment):
    base = write_fake_cifar(tmp_path, "cifar10", 20, 5)
    bad = os.path.join(base, "test_batch")
    with open(bad, "wb") as f:
        f.write(payload)
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(tmp_path, "cifar10", train=False, download=False)
    msg = _one_line(e)
    assert bad in msg and fragment in msg


def test_bytes_keys_and_int_data_accepted(tmp_path):
    base = os.path.join(tmp_path, "cifar-100-python")
    os.makedirs(base)
    data = np.arange(2 * 3072).reshape(2, 3072) % 256  # int64, values 0..255
    for name in ("train", "test"):
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [3, 99]}, f)
    images, labels = D.load_cifar(tmp_path, "cifar100", train=True)
    assert labels.tolist() == [3, 99] and images[1, 0, 1, 0].item() == (3072 + 1) % 256
    # numpy-1.x pickles (like the official files) name numpy.core.multiarray; numpy 2 must still read them
    blob = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [7]}, protocol=2)
    with open(os.path.join(base, "test"), "wb") as f:
        f.write(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert D.load_cifar(tmp_path, "cifar100", train=False)[1].tolist() == [7]


# ---------------------------------------------------------------------------------------------- batched crop/flip


def _coded_images(n):
    """uint8 [N,3,32,32]: ch0 = column+1, ch1 = row+1, ch2 = (index % 250)+1 (all nonzero, position-recoverable)."""
    img = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    img[:, 0] = torch.arange(1, 33, dtype=torch.uint8).view(1, 1, 32)
    img[:, 1] = torch.arange(1, 33, dtype=torch.uint8).view(1, 32, 1)
    img[:, 2] = (torch.arange(n) % 250 + 1).to(torch.uint8).view(n, 1, 1)
    return img


def _recover(out):
    """(dy, dx, flip) per image from a crop/flip of _coded_images (valid region is >= 28x28, never empty)."""
    dys, dxs, flips = [], [], []
    for o in out:
        rows = (o[1] > 0).any(1).nonzero().flatten()
        cols = (o[0] > 0).any(0).nonzero().flatten()
        y0, c0, c1 = rows[0].item(), cols[0].item(), cols[1].item()
        dys.append(int(o[1, y0, c0]) - 1 - y0)
        flip = int(o[0, y0, c1]) < int(o[0, y0, c0])
        src = int(o[0, y0, c0]) - 1  # source column of output column c0
        dxs.append(src - ((31 - c0) if flip else c0))
        flips.append(flip)
    return torch.tensor(dys), torch.tensor(dxs), torch.tensor(flips)


def random_crop_flip(images, pad=4, generator=None):
    """The loader's training augmentation (one draw, one gather) on NCHW images of any dtype."""
    return G._crop_flip(images, *G._draw_crop_flip(images.shape[0], pad, images.device, generator))


def test_random_crop_flip_matches_torchvision_ops():
    n = 2000
    img = _coded_images(n)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(img, pad=4, generator=g)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    dy, dx, flip = _recover(out)
    for d in (dy, dx):  # every offset in [-4, 4] occurs, roughly uniformly, on both axes
        counts = torch.bincount(d + 4, minlength=9)
        assert d.min() >= -4 and d.max() <= 4 and len(counts) == 9
        assert counts.min() > n / 9 * 0.7 and counts.max() < n / 9 * 1.3
    assert abs(flip.sum().item() - n / 2) < 5 * (n * 0.25) ** 0.5  # Binomial(n, 1/2), 5 sigma
    # each image equals torchvision's pad-with-zeros + crop (+ hflip) at the recovered parameters: padded region is
    # exactly zero, content moves with its image
    for i in range(0, n, 7):
        ref = TF.crop(TF.pad(img[i], [4]), int(dy[i]) + 4, int(dx[i]) + 4, 32, 32)
        ref = TF.hflip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref)
    # float input: same geometry for the same draws, zeros in the padded region
    outf = random_crop_flip(img.float(), pad=4, generator=torch.Generator().manual_seed(0))
    assert outf.dtype == torch.float32 and torch.equal(outf, out.float())


def test_random_crop_flip_keeps_labels_with_images():
    img = _coded_images(300)
    out = random_crop_flip(img, generator=torch.Generator().manual_seed(3))
    code = out[:, 2].flatten(1).max(1).values  # max over the valid region = the image's code
    assert torch.equal(code, img[:, 2, 0, 0])
    # the code channel is constant over the valid region and zero elsewhere
    assert ((out[:, 2] == 0) | (out[:, 2] == code.view(-1, 1, 1))).all()


# ---------------------------------------------------------------------------------------------- GpuCifarLoader (CPU)


def _decode(x, mean, std):
    """Normalised float batch -> uint8 pixels (exact inverse up to rounding)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return torch.round((x * s + m) * 255).to(torch.uint8)


def _index_images(n):
    """HWC uint8 images encoding their index in channels 1 (index // 250 + 1) and 2 (index % 250 + 1)."""
    img = torch.zeros(n, 32, 32, 3, dtype=torch.uint8)
    idx = torch.arange(n)
    img[..., 1] = (idx // 250 + 1).to(torch.uint8).view(n, 1, 1)
    img[..., 2] = (idx % 250 + 1).to(torch.uint8).view(n, 1, 1)
    img[..., 0] = 200
    return img, idx


def _epoch(loader, mean, std):
    xs, ys = zip(*list(loader))
    x, y = torch.cat(xs), torch.cat(ys)
    px = _decode(x, mean, std)
    code = (px[:, 1].flatten(1).max(1).values.long() - 1) * 250 + px[:, 2].flatten(1).max(1).values.long() - 1
    return x, y, code


def test_gpu_loader_epoch_coverage_and_reproducibility():
    n, bs = 613, 128
    images, labels = _index_images(n)
    mean, std = D.MEAN_STD["cifar100"]
    loader = G.GpuCifarLoader(images, labels, bs, mean=mean, std=std, train=True, device="cpu", seed=5)
    assert len(loader) == 5 and loader.shard_samples == n and len(loader.dataset) == n
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes == [128] * 4 + [101]  # drop_last=False
    loader.set_epoch(3)
    x3, y3, code3 = _epoch(loader, mean, std)
    assert x3.dtype == torch.float32 and y3.dtype == torch.int64
    assert sorted(y3.tolist()) == list(range(n))  # every sample exactly once
    assert torch.equal(code3, y3)  # labels stay with their images
    loader.set_epoch(3)
    x3b, y3b, _ = _epoch(loader, mean, std)
    assert torch.equal(x3, x3b) and torch.equal(y3, y3b)  # same seed + epoch -> same batches
    again = G.GpuCifarLoader(images, labels, bs, mean=mean, std=std, train=True, device="cpu", seed=5)
    again.set_epoch(3)
    assert torch.equal(_epoch(again, mean, std)[0], x3)  # resumable: a fresh loader at epoch 3
    x4, y4, _ = _epoch(loader, mean, std)  # no set_epoch: advances to epoch 4
    assert not torch.equal(y3, y4) and not torch.equal(x3, x4)
    other = G.GpuCifarLoader(images, labels, bs, mean=mean, std=std, train=True, device="cpu", seed=6)
    other.set_epoch(3)
    assert not torch.equal(_epoch(other, mean, std)[1], y3)
    # augmentation happens: some pixels are zero padding (pixel value 0 in every channel)
    assert (_decode(x3, mean, std) == 0).all(1).any()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_gpu_loader_test_mode_matches_torchvision_exactly(cifar_root, dataset):
    images, labels = D.load_cifar(cifar_root, dataset, train=False, download=False)
    mean, std = D.MEAN_STD[dataset]
    gpu = G.GpuCifarLoader(images, labels, 16, mean=mean, std=std, train=False, device="cpu")
    cpu = D.CifarDataset(images, labels, D.cifar_transforms(dataset, train=False))
    xg = torch.cat([x for x, _ in gpu])
    yg = torch.cat([y for _, y in gpu])
    xc = torch.stack([cpu[i][0] for i in range(len(cpu))])
    assert torch.equal(yg, labels) and torch.equal(xg, xc)  # bit-identical, same order


def test_gpu_loader_train_distribution_matches_torchvision_pipeline():
    """The DataLoader path's RandomCrop/flip on the same coded image gives offsets in the same range and zero fill
    in pixel space, i.e. its decoded output is one of the GPU path's 162 possible outputs."""
    img = _coded_images(1)[0]  # CHW uint8
    hwc = img.permute(1, 2, 0).contiguous()
    mean, std = D.MEAN_STD["cifar10"]
    ds = D.CifarDataset(hwc.unsqueeze(0), torch.zeros(1, dtype=torch.int64), D.cifar_transforms("cifar10", True))
    torch.manual_seed(0)
    seen = set()
    for _ in range(150):
        px = _decode(ds[0][0].unsqueeze(0), mean, std)
        dy, dx, flip = _recover(px)
        seen.add((int(dy), int(dx), bool(flip)))
        ref = G._crop_flip(img.unsqueeze(0), dy, dx, flip)
        assert torch.equal(px, ref)
    assert {d for d, _, _ in seen} == set(range(-4, 5)) and {d for _, d, _ in seen} == set(range(-4, 5))


def test_gpu_loader_channels_last():
    images, labels = _index_images(10)
    loader = G.GpuCifarLoader(images, labels, 4, mean=(0.5,) * 3, std=(0.5,) * 3, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- DataLoader wrapper


def _labels(loader):
    return torch.cat([y for _, y in loader])


def test_train_loader_order_is_resumable(cifar_root):
    train = D.build_loaders("cifar10", cifar_root, 16, num_workers=0, seed=3, download=False).train
    assert isinstance(train, D.TrainLoader)
    orders = []
    for epoch in range(3):  # uninterrupted run: set_epoch each epoch
        train.set_epoch(epoch)
        orders.append(_labels(train))
    resumed = D.build_loaders("cifar10", cifar_root, 16, num_workers=0, seed=3, download=False).train
    resumed.set_epoch(2)
    assert torch.equal(_labels(resumed), orders[2])
    assert not torch.equal(orders[0], orders[1])
    resumed.set_epoch(2, start=3 * 16)  # mid-epoch resume at sample 48: the remaining batches of that epoch
    assert len(resumed) == len(train) - 3 and torch.equal(_labels(resumed), orders[2][3 * 16 :])
    resumed.set_epoch(2, start=40)  # a position saved with another batch size: the epoch goes on from sample 40
    assert torch.equal(_labels(resumed), orders[2][40:])


def test_train_loader_batches_do_not_depend_on_workers(cifar_root):
    """Order and augmentation are functions of (seed, epoch, index): 0 and 2 workers give the same tensors."""

    def batches(workers, start=0):
        train = D.build_loaders("cifar100", cifar_root, 64, num_workers=workers, seed=0, download=False).train
        train.set_epoch(1, start=start * 64)
        return list(train), train

    ref, _ = batches(0)
    two, train = batches(2)
    assert train.persistent_workers and not train.pin_memory
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, two))
    assert len(ref) == len(two) and sorted(_labels(ref).tolist()) == sorted(
        D.load_cifar(cifar_root, "cifar100", True)[1].tolist()
    )
    tail, _ = batches(2, start=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref[2:], tail))


def test_seeded_samples_keep_main_process_rng(cifar_root):
    images, labels = D.load_cifar(cifar_root, "cifar10", True, download=False)
    ds = D.SeededSamples(D.CifarDataset(images, labels, D.cifar_transforms("cifar10", True)), seed=4)
    torch.manual_seed(0)
    a = ds[(1, 5)][0]
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(ds[(1, 5)][0], a) and torch.equal(torch.rand(1), after)
    assert not torch.equal(ds[(2, 5)][0], a)  # another epoch, another crop


def test_seeded_samples_leave_cuda_generators_alone(cifar_root, monkeypatch):
    """Issue 24 bug 2: per-sample seeding in the main process (--num_workers=0) must not reseed the CUDA generators,
    which fork_rng(devices=[]) does not restore; torch.manual_seed reseeds them through torch.cuda.manual_seed_all."""
    images, labels = D.load_cifar(cifar_root, "cifar10", True, download=False)
    ds = D.SeededSamples(D.CifarDataset(images, labels, D.cifar_transforms("cifar10", True)), seed=4)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    ds[(1, 5)]
    assert calls == []


def test_val_split_is_fixed_and_disjoint():
    tr, va = D.val_split_indices(100, 10)
    tr2, va2 = D.val_split_indices(100, 10)
    assert torch.equal(va, va2) and len(va) == 10 and len(tr) == 90
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    with pytest.raises(D.DatasetError):
        D.val_split_indices(10, 10)


# ---------------------------------------------------------------------------------------------- ILSVRC folders


@pytest.mark.parametrize("slash", ["", "/"])
def test_imagefolder_train_val(imagenet_root, slash):
    train, _, test, num_classes = D.build_loaders("ilsvrc", imagenet_root + slash, 5, num_workers=0)
    assert num_classes == 3 and len(train.dataset) == 12 and len(test.dataset) == 12
    assert len(train) == 3 and len(test) == 3
    x, y = next(iter(train))
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    ys = torch.cat([y for _, y in test])
    assert ys.tolist() == sorted(ys.tolist()) and set(ys.tolist()) == {0, 1, 2}  # test: not shuffled
    x, _ = next(iter(test))
    assert x.shape == (5, 3, 224, 224)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.build_loaders("ilsvrc", tmp_path, 4)
    assert "val" in _one_line(e)
    os.makedirs(tmp_path / "train" / "n0001")
    os.makedirs(tmp_path / "val" / "n0001")
    with pytest.raises(D.DatasetError) as e:
        D.build_loaders("ilsvrc", tmp_path, 4)
    assert "no images" in _one_line(e)


def test_imagefolder_class_mismatch(tmp_path):
    write_fake_imagefolder(tmp_path, classes=3, per_class=1)
    import shutil

    shutil.rmtree(tmp_path / "val" / "n00000001")
    with pytest.raises(D.DatasetError) as e:
        D.build_loaders("ilsvrc", tmp_path, 4, num_workers=0)
    assert "class folders" in _one_line(e)
    _, _, test, n = D.build_loaders("ilsvrc", tmp_path, 4, num_workers=0, train=False)  # eval only: no comparison
    assert n == 2 and len(test.dataset) == 2


# ---------------------------------------------------------------------------------------------- build_loaders


@pytest.mark.parametrize("dataset,classes,n_train,n_test", [("cifar10", 10, 103, 37), ("cifar100", 100, 211, 50)])
@pytest.mark.parametrize("gpu_pipeline", [None, True, False])
def test_build_loaders_cifar(cifar_root, dataset, classes, n_train, n_test, gpu_pipeline):
    train, val, test, num_classes = D.build_loaders(
        dataset, cifar_root, 32, num_workers=0, device="cpu", gpu_pipeline=gpu_pipeline, download=False
    )
    assert num_classes == classes and val is None
    assert isinstance(train, G.GpuCifarLoader if gpu_pipeline else D.TrainLoader)
    assert len(train.dataset) == n_train and len(test.dataset) == n_test
    assert len(train) == -(-n_train // 32) and len(test) == -(-n_test // 32)
    train.set_epoch(0)
    for loader in (train, test):
        batches = list(loader)
        assert len(batches) == len(loader)
        x, y = batches[0]
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < classes
        assert sum(b[1].numel() for b in batches) == len(loader.dataset)
    # test loader order is the file order
    assert torch.equal(torch.cat([y for _, y in test]), D.load_cifar(cifar_root, dataset, False)[1])


def test_build_loaders_eval_only_and_errors(cifar_root, tmp_path):
    train, _, test, n = D.build_loaders("cifar10", cifar_root, 8, num_workers=0, train=False)
    assert train is None and n == 10 and len(test.dataset) == 37
    # eval only does not need the train files
    base = write_fake_cifar(tmp_path, "cifar10", 10, 6)
    os.remove(os.path.join(base, "data_batch_1"))
    assert len(D.build_loaders("cifar10", tmp_path, 8, num_workers=0, train=False).test.dataset) == 6
    with pytest.raises(ValueError):
        D.build_loaders("mnist", cifar_root, 8)
    with pytest.raises(ValueError):
        D.build_loaders("ilsvrc", cifar_root, 8, gpu_pipeline=True)


def test_fake_cifar_is_learnable():
    """Nearest class mean on raw pixels separates the fake classes far above chance (so smoke runs can learn)."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        write_fake_cifar(root, "cifar100", 1000, 300, seed=0)
        xtr, ytr = D.load_cifar(root, "cifar100", True)
        xte, yte = D.load_cifar(root, "cifar100", False)
    xtr, xte = xtr.flatten(1).float(), xte.flatten(1).float()
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(100)])
    acc = (torch.cdist(xte, means).argmin(1) == yte).float().mean().item()
    assert acc > 0.5


def test_protocol2_pickle_with_empty_bytes_is_read(tmp_path):
    """Python 3 writes ``b''`` in a protocol-2 pickle as a call of ``__builtin__.bytes``: mapped to python 3 names
    before the allow-list, it is read."""
    base = write_fake_cifar(tmp_path, "cifar10", 20, 5)
    blob = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2], "batch_label": b""}, protocol=2)
    assert b"__builtin__" in blob
    with open(os.path.join(base, "test_batch"), "wb") as f:
        f.write(blob)
    assert D.load_cifar(tmp_path, "cifar10", train=False, download=False)[1].tolist() == [1, 2]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_corrupt_imagefolder_image_is_one_line_naming_it(tmp_path, split, workers, damage):
    from utils import cli

    root = write_fake_imagefolder(tmp_path, classes=2, per_class=2, size=36, seed=0)
    folder = os.path.join(root, split, "n00000001")
    bad = os.path.join(folder, sorted(os.listdir(folder))[0])
    if damage == "truncated":
        with open(bad, "rb") as f:
            head = f.read()[:60]
        with open(bad, "wb") as f:
            f.write(head)
    else:
        with open(bad, "wb") as f:
            f.write(b"GIF89a this is no image at all")
    loaders = D.build_loaders("ilsvrc", root, 2, num_workers=workers)
    loader = loaders.train if split == "train" else loaders.test
    if split == "train":
        loader.set_epoch(0)
    with pytest.raises(D.DatasetError) as e:
        for _ in loader:
            pass
    line = cli._one_line(e.value)
    assert line.startswith(f"image {bad!r} cannot be read") and "replace or remove it" in line, line
    assert "\n" not in line and "Traceback" not in line
