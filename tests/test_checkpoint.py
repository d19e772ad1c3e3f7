"""utils/checkpoint.py (atomic writes, round trips, RNG state) and models/pretrained.py (weights_only loading, prefix
stripping, the right model from a file), on CPU, in seconds."""

import os
import random
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import get_model
from models import pretrained as P
from models.atomic import _umask
from models.registry import flag_wording
from utils import checkpoint as C


def _tiny():
    torch.manual_seed(0)
    return get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)


def _files(directory):
    return sorted(os.listdir(directory))


def _ckpt(model, **extra):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # stand-in gradients (no backward pass needed to create momentum buffers)
        p.grad = torch.randn_like(p)
    opt.step()
    return C.make_checkpoint(model, opt, epoch=3, acc=12.5, **extra), opt


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_file(tmp_path):
    path = str(tmp_path / "a.pth")
    C.atomic_write_bytes(b"old", path)
    C.atomic_write_bytes(b"new contents", path)
    assert open(path, "rb").read() == b"new contents"
    assert _files(tmp_path) == ["a.pth"]  # no temporary files left behind
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # as open() would create it, not mkstemp's 0600


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "interrupt"])
def test_failed_save_keeps_old_file(tmp_path, monkeypatch, where):
    """A crash or a full disk while writing leaves the previous checkpoint intact and no partial file."""
    model = _tiny()
    path = str(tmp_path / "run.pth")
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=1.0), path)
    before = open(path, "rb").read()

    if where == "write":  # disk full half-way through the file
        real_fdopen = os.fdopen

        class _Full:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _Full(real_fdopen(fd, mode)))
        error = OSError
    elif where == "fsync":

        def fail(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", fail)
        error = OSError
    elif where == "replace":

        def fail(src, dst):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "replace", fail)
        error = OSError
    else:

        def interrupt(fd):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "fsync", interrupt)
        error = KeyboardInterrupt

    with pytest.raises(error):
        C.save_checkpoint(C.make_checkpoint(model, None, epoch=2, acc=2.0), path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert _files(tmp_path) == ["run.pth"]
    assert P.read_checkpoint(path)["epoch"] == 1


def test_serialisation_failure_writes_nothing(tmp_path):
    path = str(tmp_path / "x.pth")
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises)
        C.save_checkpoint({"bad": lambda: None}, path)  # not picklable
    assert _files(tmp_path) == []


def test_save_to_several_paths(tmp_path):
    model = _tiny()
    paths = [str(tmp_path / "best.pth"), str(tmp_path / "last.pth")]
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=1.0), paths)
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()


# ---------------------------------------------------------------------------------------------------------------------
# contents and round trip
# ---------------------------------------------------------------------------------------------------------------------


def test_round_trip_and_weights_only(tmp_path):
    model = _tiny()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    ckpt, opt = _ckpt(
        model,
        acc5=50.0,
        best_acc=12.5,
        best_acc5=50.0,
        best_epoch=3,
        stage=1,
        scaler_state_dict=scaler.state_dict(),
        rng_state=C.capture_rng_state(),
        args={"lr": 0.1, "model": "ResNet32_DoubleShared", "schedule": {"milestones": [150, 225]}, "path": tmp_path},
    )
    path = str(tmp_path / "ckpt.pth")
    C.save_checkpoint(ckpt, path)

    obj = torch.load(path, map_location="cpu", weights_only=True)  # everything is weights_only-safe
    assert {"net_state_dict", "optimizer_state_dict", "acc", "epoch"} <= set(obj)  # the authors' keys
    assert obj["format_version"] == C.FORMAT_VERSION
    assert obj["model"] == "ResNet32_DoubleShared" and obj["dataset"] == "cifar10"
    assert obj["model_kwargs"] == {"shared_rank": 1, "unique_rank": 1}
    assert obj["epoch"] == 3 and isinstance(obj["epoch"], int)
    assert obj["acc"].dim() == 0 and obj["acc"].device.type == "cpu" and float(obj["acc"]) == 12.5
    assert type(obj["args"]) is dict and obj["args"]["path"] == str(tmp_path)  # paths stored as strings
    assert all(v.device.type == "cpu" for v in obj["net_state_dict"].values())
    # every alias key of the shared bases is present, as in the authors' files
    assert set(obj["net_state_dict"]) == set(model.state_dict())

    fresh = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    P.load_weights(fresh, path)
    model.eval(), fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh.shared_basis_1_1 is fresh.layer1[1].shared_basis_1  # still one tensor after loading

    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(obj["optimizer_state_dict"])
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_shared_basis_is_stored_once(tmp_path, device):
    """The aliases of a shared basis (one tensor, several state_dict keys) are one storage in the file, also when the
    model lives on a GPU (each alias copied to the CPU separately would store it once per block)."""
    model = _tiny().to(device)
    path = str(tmp_path / "ckpt.pth")
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=0.0), path)
    state = torch.load(path, map_location="cpu", weights_only=True)["net_state_dict"]
    live = model.state_dict()
    by_tensor = {}
    for key, value in live.items():
        by_tensor.setdefault(value.data_ptr(), []).append(key)
    aliased = [keys for keys in by_tensor.values() if len(keys) > 1]
    assert aliased  # the model does share tensors under several keys
    for keys in aliased:
        assert len({state[k].untyped_storage().data_ptr() for k in keys}) == 1, keys


def test_authors_four_key_file_loads(tmp_path):
    model = _tiny()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that the buffers are compared too
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape) + 0.5)
            else:
                b.fill_(7)  # num_batches_tracked
    path = str(tmp_path / "ref.pth")
    torch.save(
        {"net_state_dict": model.state_dict(), "optimizer_state_dict": {}, "acc": torch.tensor(93.07), "epoch": 300},
        path,
    )
    obj = P.read_checkpoint(path)
    assert P.checkpoint_acc(obj) == pytest.approx(93.07)
    P.check_identity(obj, path, dataset="cifar100", model="Anything")  # records nothing: accepted
    torch.manual_seed(1)  # other initial weights than the file's
    fresh = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    P.load_weights(fresh, obj)
    assert _same_weights(fresh, model)  # every tensor, buffers and each alias of a shared basis included
    assert fresh.layer2[1].shared_basis_1 is fresh.shared_basis_2_1  # still one tensor per basis


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefix_stripping(tmp_path, prefix):
    model = _tiny()
    path = str(tmp_path / "p.pth")
    torch.save(
        {
            "net_state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "acc": torch.tensor(1.0),
            "epoch": 1,
        },
        path,
    )
    fresh = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    P.load_weights(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_unwrap_before_saving():
    model = _tiny()
    for wrapped in (nn.DataParallel(model), torch.compile(model), nn.DataParallel(torch.compile(model))):
        ckpt = C.make_checkpoint(wrapped, None, epoch=1, acc=0.0)
        assert set(ckpt["net_state_dict"]) == set(model.state_dict())
        assert ckpt["model"] == "ResNet32_DoubleShared"


def test_identity_check(tmp_path):
    obj = C.make_checkpoint(_tiny(), None, epoch=1, acc=0.0)
    P.check_identity(obj, "f", dataset="cifar10", model="ResNet32_DoubleShared")
    P.check_identity(obj, "f", dataset="cifar10", model=None)
    with pytest.raises(P.CheckpointError, match="trained on cifar10"):
        P.check_identity(obj, "f", dataset="cifar100")
    with pytest.raises(P.CheckpointError, match='pass model="ResNet32_DoubleShared"'):  # Python's words
        P.check_identity(obj, "f", dataset="cifar10", model="ResNet20")
    with flag_wording(), pytest.raises(P.CheckpointError, match="pass --model=ResNet32_DoubleShared"):  # the scripts'
        P.check_identity(obj, "f", dataset="cifar10", model="ResNet20")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncate"])
def test_unreadable_files(tmp_path, content):
    path = str(tmp_path / "bad.pth")
    if content == "truncate":
        C.save_checkpoint(C.make_checkpoint(_tiny(), None, epoch=1, acc=0.0), path)
        data = open(path, "rb").read()
        content = data[: len(data) // 2]
    open(path, "wb").write(content)
    with pytest.raises(P.CheckpointError, match="not a readable PyTorch checkpoint"):
        P.read_checkpoint(path)
    with pytest.raises(P.CheckpointError, match="does not exist"):
        P.read_checkpoint(str(tmp_path / "missing.pth"))


def test_rng_state_round_trip(tmp_path):
    state = C.capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    path = str(tmp_path / "rng.pth")
    C.save_checkpoint({"rng_state": state}, path)
    torch.rand(10), np.random.rand(10), random.random()  # move the streams on
    C.restore_rng_state(torch.load(path, weights_only=True)["rng_state"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]


# ---------------------------------------------------------------------------------------------------------------------
# load_model: the right model from a file alone
# ---------------------------------------------------------------------------------------------------------------------

FAMILIES = [
    ("cifar10", "ResNet32_SingleShared", {"shared_rank": 2, "unique_rank": 1}),
    ("cifar10", "ResNet32_DoubleShared", {"shared_rank": 3, "unique_rank": 2}),
    ("cifar100", "ResNet34_SharedOnly", {"shared_rank": 2}),
    ("cifar100", "ResNet34_NonShared", {"unique_rank": 3}),
    pytest.param("ilsvrc", "ResNet34_DoubleShared", {"shared_rank": 2, "unique_rank": 1}, marks=pytest.mark.slow),
    pytest.param("cifar100", "DenseNet121_SingleShared", {"shared_rank": 2, "unique_rank": 1}, marks=pytest.mark.slow),
    pytest.param("cifar100", "ResNext50_SingleShared", {"shared_rank": 64, "unique_rank": 4}, marks=pytest.mark.slow),
    ("cifar100", "MobileNetV2_Shared", {}),
]


@pytest.fixture
def one_thread():
    """Model construction runs QR for the orthogonal bases: with two threads on a busy 2-core machine one small QR
    takes 100x longer (spinning OpenMP threads), so these tests build on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dataset, name, ranks", FAMILIES, ids=lambda v: v if isinstance(v, str) else "")
def test_load_model_our_and_authors_files(tmp_path, dataset, name, ranks, one_thread):
    torch.manual_seed(0)
    model = get_model(name, dataset, **ranks)
    ours, authors = str(tmp_path / "ours.pth"), str(tmp_path / "authors.pth")
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=7, acc=42.0), ours)
    prefix = "module." if dataset == "ilsvrc" else ""  # the authors' ILSVRC files are DataParallel state_dicts
    torch.save(
        {
            "net_state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "optimizer_state_dict": {},
            "acc": torch.tensor(42.0),
            "epoch": 7,
        },
        authors,
    )

    net, ckpt = P.load_model(ours)  # nothing but the path
    assert net.cfg.name == name and net.cfg.dataset == dataset and net.cfg.build_kwargs() == ranks
    assert not net.training and ckpt["epoch"] == 7 and _same_weights(net, model)

    net, ckpt = P.load_model(authors, model=name, dataset=dataset)  # ranks read off the shapes
    assert net.cfg.build_kwargs() == ranks and _same_weights(net, model) and P.checkpoint_acc(ckpt) == 42.0

    net, _ = P.load_model(authors, model=name, dataset=dataset, **ranks)  # the README's flags, all given
    assert _same_weights(net, model)
    with pytest.raises(P.CheckpointError, match="records no model"):
        P.load_model(authors, dataset=dataset)


@pytest.mark.parametrize(
    "dataset, name, ranks",
    [
        ("cifar10", "ResNet56_DoubleShared", {"shared_rank": 2}),
        ("cifar100", "DenseNet121_SingleShared", {}),
        ("ilsvrc", "MobileNetV2_SharedDouble", {}),
    ],
)
def test_layouts_and_loading_skip_random_init_but_not_shapes(tmp_path, dataset, name, ranks, one_thread):
    """Layout probes (meta device) and load_model build without random init: the keys, order and shapes of a real
    build, the caller's random stream untouched, and exactly the file's weights."""
    model = get_model(name, dataset, **ranks)
    real = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(P._layout(name, dataset, **ranks).items()) == real
    path = str(tmp_path / "m.pth")
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=1.0), path)
    expected = torch.manual_seed(5).get_state()
    net, _ = P.load_model(path)
    assert torch.equal(torch.get_rng_state(), expected) and _same_weights(net, model)


@pytest.mark.parametrize(
    "name, ranks", [("ResNet34_DoubleShared", {"shared_rank": 4, "unique_rank": 1}), ("MobileNetV2_Shared", {})]
)
def test_an_ilsvrc_model_of_another_class_count_loads_from_its_file(tmp_path, name, ranks, one_thread):
    """ILSVRC models train on any ImageFolder tree: a 4-class file (ours or the authors' format) rebuilds a 4-way head;
    CIFAR heads stay the dataset's."""
    torch.manual_seed(0)
    model = get_model(name, "ilsvrc", num_classes=4, **ranks)
    path = str(tmp_path / "four.pth")
    torch.save({"net_state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    net, _ = P.load_model(path, model=name, dataset="ilsvrc")
    assert net.cfg.num_classes == 4 and net.cfg.build_kwargs() == ranks and _same_weights(net, model)
    assert P.head_classes("ilsvrc", model.state_dict()) == 4
    assert P.head_classes("ilsvrc", get_model(name, "ilsvrc", **ranks).state_dict()) is None  # 1000: the default
    assert P.head_classes("cifar100", get_model("ResNet34", "cifar100").state_dict()) is None


def test_load_model_mismatches_name_the_right_flags(tmp_path, one_thread):
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    ours, authors = str(tmp_path / "ours.pth"), str(tmp_path / "authors.pth")
    C.save_checkpoint(C.make_checkpoint(model, None, epoch=1, acc=1.0), ours)
    torch.save({"net_state_dict": model.state_dict(), "acc": torch.tensor(1.0), "epoch": 1}, authors)
    fits = "pass shared_rank=2, unique_rank=1"  # Python keywords: load_model is called from Python
    for path, kw in ((ours, {}), (authors, {"model": "ResNet32_DoubleShared", "dataset": "cifar10"})):
        with pytest.raises(P.CheckpointError, match=fits) as e:
            P.load_model(path, **kw, shared_rank=4)
        assert "not shared_rank=4;" in str(e.value)
        with pytest.raises(P.CheckpointError, match=fits):
            P.load_model(path, **kw, shared_rank=2, unique_rank=3)
    with pytest.raises(P.CheckpointError, match='pass model="ResNet32_DoubleShared", shared_rank=2, unique_rank=1'):
        P.load_model(ours, model="ResNet56_DoubleShared")
    with pytest.raises(P.CheckpointError, match="trained on cifar10"):
        P.load_model(ours, dataset="cifar100")
    with pytest.raises(
        P.CheckpointError, match='the file fits model="ResNet32_DoubleShared", shared_rank=2, unique_rank=1'
    ):
        P.load_model(authors, model="ResNet20", dataset="cifar10")
    with pytest.raises(P.CheckpointError, match="records no dataset"):
        P.load_model(authors, model="ResNet32_DoubleShared")
    # a rank the model does not take is ignored, as the scripts ignore it
    net, _ = P.load_model(ours, unique_rank=1, shared_rank=2)
    assert net.cfg.build_kwargs() == {"shared_rank": 2, "unique_rank": 1}


@pytest.mark.parametrize("what", ["directory", "empty"])
def test_read_checkpoint_directory_and_empty_file(tmp_path, what):
    path = tmp_path / "x.pth"
    if what == "directory":
        path.mkdir()
        needle = "is a directory"
    else:
        path.write_bytes(b"")
        needle = "the file is empty"
    with pytest.raises(P.CheckpointError, match=needle):
        P.read_checkpoint(str(path))


def test_hostile_recorded_ranks_are_refused_before_any_model_is_built(tmp_path, monkeypatch, one_thread):
    """A tiny file whose metadata asks for a huge model is refused from its tensor shapes, without building it."""
    path = str(tmp_path / "hostile.pth")
    ckpt = C.make_checkpoint(_tiny(), None, epoch=1, acc=0.0, args={"shared_rank": 10**7})
    ckpt["model_kwargs"] = {"shared_rank": 10**7, "unique_rank": 1}
    C.save_checkpoint(ckpt, path)
    built = []
    real_get_model = P.get_model
    monkeypatch.setattr(P, "get_model", lambda *a, **kw: built.append(kw) or real_get_model(*a, **kw))
    start = time.perf_counter()
    with pytest.raises(P.CheckpointError) as e:
        P.load_model(path)
    assert time.perf_counter() - start < 0.8
    message = str(e.value)
    assert "\n" not in message and "records shared_rank=10000000, unique_rank=1" in message  # Python's words
    assert "its tensors hold shared_rank=1, unique_rank=1" in message
    assert all(kw.get("shared_rank", 0) <= 32 for kw in built)  # only the default-size probes were built
    with pytest.raises(P.CheckpointError, match="records shared_rank=10000000"):
        P.build_model("ResNet32_DoubleShared", checkpoint=path)


def test_user_ranks_are_bounded_before_building():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"shared_rank=10000000 is too large for ResNet32_DoubleShared \(at most 144"):
        P.build_model("ResNet32_DoubleShared", shared_rank=10**7)
    assert time.perf_counter() - start < 0.5


def test_cli_bounds_ranks(capsys):
    from utils import cli

    with pytest.raises(SystemExit) as e:
        cli.parse_train_args("cifar10", ["--shared_rank=100000"], prog="t")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "rank from 1 to 4096, got 100000" in err, err
