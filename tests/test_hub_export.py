"""hubconf.py (torch.hub entry points) and models/export.py (fold + torch.export + check), on CPU.

CIFAR models run at 32x32, ILSVRC models at 64x64 (their global pooling allows it) to keep the file fast.
"""

import copy
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from models import export as E
from models import fold, get_model, list_models
from models.pretrained import CheckpointError
from models.summary import count_macs, count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads spin against other processes and make tracing
    and the big forward passes several times slower. Restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _hub_list(repo):
    """``torch.hub.list(repo, source="local")`` where torch supports it; torch 2.14's ``list`` only takes GitHub repos
    (no ``source``), so otherwise the same thing by hand: import hubconf.py by path with the repo first on sys.path and
    take its public callables, exactly as ``torch.hub.list`` does after downloading."""
    if "source" in inspect.signature(torch.hub.list).parameters:
        return torch.hub.list(repo, source="local")
    sys.path.insert(0, repo)
    try:
        spec = importlib.util.spec_from_file_location("hubconf", os.path.join(repo, "hubconf.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(repo)
    return module, [f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")]


def _hub_load(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", **kwargs)


@torch.no_grad()
def _randomize(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so folding and loading are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _authors_file(model, path):
    """The authors' format: DataParallel ``module.`` keys, their four keys, nothing about the model."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"net_state_dict": state, "optimizer_state_dict": {}, "acc": torch.tensor(91.5), "epoch": 7}, path)
    return str(path)


def _project_file(model, path):
    """This project's format: the authors' keys plus what rebuilding needs."""
    cfg = model.cfg
    torch.save(
        {
            "net_state_dict": model.state_dict(),
            "optimizer_state_dict": None,
            "acc": torch.tensor(70.0),
            "epoch": 3,
            "format_version": 1,
            "model": cfg.name,
            "dataset": cfg.dataset,
            "model_kwargs": cfg.build_kwargs(),
        },
        path,
    )
    return str(path)


def _same_outputs(a, b, size, batch=3):
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------------
# hubconf.py
# ---------------------------------------------------------------------------------------------------------------------


def test_hub_lists_every_registered_model_with_a_one_line_doc():
    listed = _hub_list(REPO)
    module, names = listed if isinstance(listed, tuple) else (None, listed)
    registered = {q.split("/", 1)[1] for q in list_models()}
    assert set(names) == registered  # nothing else is public: helpers would show up as entry points
    if module is not None:
        assert module.dependencies == ["torch", "torchvision"]
        for name in names:
            doc = getattr(module, name).__doc__
            assert doc and "\n" not in doc and name in doc, name
        assert "dataset=cifar100|ilsvrc (required)" in module.MobileNetV2_Shared.__doc__
        assert "shared_rank=16, unique_rank=1" in module.ResNet56_DoubleShared.__doc__
        assert "shared_rank" not in inspect.signature(module.MobileNetV2_Shared).parameters


def test_hub_load_authors_file_cifar10_infers_ranks(tmp_path):
    torch.manual_seed(0)
    src = _randomize(get_model("ResNet32_DoubleShared", "cifar10", shared_rank=4, unique_rank=2))
    path = _authors_file(src, tmp_path / "authors.pth")
    model = _hub_load("ResNet32_DoubleShared", checkpoint=path)  # dataset: the only one; ranks: off the shapes
    assert (model.cfg.dataset, model.cfg.shared_rank, model.cfg.unique_rank) == ("cifar10", 4, 2)
    assert _same_outputs(model, src, (3, 32, 32))


def test_hub_load_project_file_cifar100_uses_recorded_dataset_and_ranks(tmp_path):
    torch.manual_seed(0)
    src = _randomize(get_model("ResNet34_SingleShared", "cifar100", shared_rank=4, unique_rank=2))
    path = _project_file(src, tmp_path / "c100.pth")
    model = _hub_load("ResNet34_SingleShared", checkpoint=path)  # two datasets, but the file says which
    assert model.cfg == src.cfg
    assert _same_outputs(model, src, (3, 32, 32))


def test_hub_load_ilsvrc_with_explicit_arguments(tmp_path):
    torch.manual_seed(0)
    src = _randomize(get_model("ResNet34_DoubleShared", "ilsvrc", shared_rank=8, unique_rank=1))
    path = _project_file(src, tmp_path / "ilsvrc.pth")
    model = _hub_load("ResNet34_DoubleShared", dataset="ilsvrc", shared_rank=8, unique_rank=1, checkpoint=path)
    assert model.cfg.num_classes == 1000
    assert _same_outputs(model, src, (3, 64, 64), batch=2)


def test_hub_load_without_checkpoint_and_clear_errors(tmp_path):
    model = _hub_load("ResNet56_DoubleShared", dataset="cifar10", shared_rank=16, unique_rank=1)
    assert model.cfg.build_kwargs() == {"shared_rank": 16, "unique_rank": 1}
    with pytest.raises(ValueError, match="cifar100 and ilsvrc: pass dataset="):
        _hub_load("MobileNetV2_Shared")
    with pytest.raises(ValueError, match="does not take shared_rank"):
        _hub_load("MobileNetV2_Shared", dataset="cifar100", shared_rank=8)

    torch.manual_seed(0)
    src = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=4, unique_rank=2)
    authors = _authors_file(src, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="shared_rank=4, unique_rank=2"):  # the caller's ranks win, and fail
        _hub_load("ResNet32_DoubleShared", shared_rank=8, unique_rank=2, checkpoint=authors)
    with pytest.raises(CheckpointError, match="at any ranks"):
        _hub_load("ResNet56_DoubleShared", checkpoint=authors)
    project = _project_file(src, tmp_path / "p.pth")
    with pytest.raises(
        CheckpointError,
        match='holds a ResNet32_DoubleShared, not a ResNet56_DoubleShared; pass model="ResNet32_DoubleShared"',
    ):
        _hub_load("ResNet56_DoubleShared", checkpoint=project)
    with pytest.raises(CheckpointError, match="does not exist"):
        _hub_load("ResNet56_DoubleShared", checkpoint=str(tmp_path / "missing.pth"))


def test_hubconf_refuses_a_foreign_models_package(monkeypatch):
    fake = type(sys)("models")
    fake.__file__ = "/somewhere/else/models/__init__.py"
    monkeypatch.setitem(sys.modules, "models", fake)
    with pytest.raises(ImportError, match="another module named 'models' is already imported"):
        _hub_load("ResNet20")


# ---------------------------------------------------------------------------------------------------------------------
# models/export.py
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_r56():
    """ResNet56_DoubleShared after a few SGD steps: BN statistics and all weights moved away from their init."""
    torch.manual_seed(0)
    model = get_model("ResNet56_DoubleShared", "cifar10", shared_rank=16, unique_rank=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_export_round_trip_resnet56(trained_r56, tmp_path):
    model = trained_r56
    before = copy.deepcopy(model.state_dict())
    out = tmp_path / "r56.pt2"
    report = E.export_model(model, out, example_input=torch.randn(2, 3, 32, 32))
    assert report["out"] == str(out) and os.path.isfile(out) and report["onnx"] is None
    assert report["folded"] and report["dynamic_batch"]
    assert report["max_rel_diff"] <= 1e-4 and report["fold_rel_diff"] <= 1e-4
    assert report["batch_sizes"] == [2, 1, 3]
    # A folded shared ResNet56 is a plain ResNet56: same parameter count and MACs.
    plain = get_model("ResNet56", "cifar10")
    assert (report["params_before"], report["macs_before"]) == (count_params(model), count_macs(model))
    assert (report["params_after"], report["macs_after"]) == (count_params(plain), count_macs(plain))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model was not changed
    assert sorted(os.listdir(tmp_path)) == ["r56.pt2"]  # no temporary files left

    program = torch.export.load(str(out)).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert _rel(program(x), model(x)) <= 1e-4


def _small_r32():
    torch.manual_seed(0)
    return _randomize(get_model("ResNet32_DoubleShared", "cifar10", shared_rank=4, unique_rank=1)).eval()


@pytest.mark.slow
def test_export_without_folding_is_exact(tmp_path):
    model = _small_r32()
    report = E.export_model(model, tmp_path / "raw.pt2", example_input=torch.randn(1, 3, 32, 32), fold=False)
    assert not report["folded"] and report["dynamic_batch"]  # batch 1 example: traced at 2, still dynamic
    assert report["params_after"] == report["params_before"] and report["max_abs_diff"] == 0.0


_FAMILIES = [
    ("DenseNet121_SingleShared", "cifar100", {}, 32),
    ("ResNext50_SingleShared", "cifar100", {"shared_rank": 64, "unique_rank": 4}, 32),
    ("MobileNetV2_Shared", "ilsvrc", {}, 64),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,dataset,ranks,hw", _FAMILIES, ids=[f[0] for f in _FAMILIES])
def test_export_round_trip_other_families(name, dataset, ranks, hw, tmp_path):
    if name not in list_models(dataset):
        pytest.skip(f"{name} is not registered for {dataset}")
    torch.manual_seed(0)
    model = _randomize(get_model(name, dataset, **ranks)).eval()
    # Two checked batches (sizes 2 and 1) keep these big models fast; the report's check loads the saved file back.
    report = E.export_model(model, tmp_path / "m.pt2", example_input=torch.randn(2, 3, hw, hw), num_batches=2)
    assert report["max_rel_diff"] <= 1e-4 and report["dynamic_batch"] and report["batch_sizes"] == [2, 1]
    if report["folded"]:
        assert report["fold_rel_diff"] <= 1e-4
        assert report["macs_after"] > 0 and report["params_after"] > 0
    assert os.path.isfile(tmp_path / "m.pt2")


def test_export_refuses_training_mode(tmp_path):
    model = get_model("ResNet20", "cifar10").train()
    with pytest.raises(ValueError, match=r"training mode .*call model.eval\(\) first"):
        E.export_model(model, tmp_path / "x.pt2", example_input=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"model.eval\(\)"):  # fold() itself says the same
        fold(model)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_fails_and_writes_nothing_when_outputs_differ(tmp_path, monkeypatch):
    def broken_fold(model):
        folded = fold(model)
        with torch.no_grad():
            folded.fc.weight.mul_(1.01)  # 1% off: far beyond the 1e-4 limit
        return folded

    monkeypatch.setattr(E, "fold_model", broken_fold)
    with pytest.raises(E.ExportError, match="max relative difference .* > 0.0001.*nothing written"):
        E.export_model(_small_r32(), tmp_path / "bad.pt2", example_input=torch.randn(2, 3, 32, 32))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # exports a model: 18 s on the shared 2 cores
def test_onnx_missing_is_one_clear_line(tmp_path, monkeypatch, capsys):
    model = _randomize(get_model("ResNet20", "cifar10"))
    ckpt = _project_file(model, tmp_path / "r20.pth")
    monkeypatch.setattr(E, "_onnx_missing", lambda: ["onnx"])
    with pytest.raises(E.OnnxUnavailableError, match="pip install onnx onnxscript"):
        E.export_model(model.eval(), tmp_path / "a.pt2", example_input=torch.randn(2, 3, 32, 32), onnx=True)
    argv = ["--dataset", "cifar10", "--model", "ResNet20", "--pretrained", ckpt, "--out", str(tmp_path / "b.pt2")]
    assert E.main(argv + ["--onnx"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install onnx onnxscript" in err
    assert sorted(os.listdir(tmp_path)) == ["r20.pth"]
    assert E.main(argv + ["--no_fold"]) == 0  # without --onnx, a missing onnx does not matter
    out = capsys.readouterr().out
    assert "not folded" in out and "max rel diff" in out


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_like_the_model(trained_r56, tmp_path):
    """onnx, onnxscript and onnxruntime are in requirements.txt, so this runs in CI: the .onnx file, run by
    onnxruntime at batch sizes other than the example's, gives the unfolded PyTorch model's logits."""
    import onnxruntime

    report = E.export_model(trained_r56, tmp_path / "r56.pt2", example_input=torch.randn(2, 3, 32, 32), onnx=True)
    assert report["onnx"] == str(tmp_path / "r56.onnx") and report["onnx_max_rel_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            expected = trained_r56(x)
        (logits,) = session.run(None, {feed.name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    model = _randomize(get_model("ResNet32_DoubleShared", "cifar10", shared_rank=8, unique_rank=2)).eval()
    ckpt = _authors_file(model, tmp_path / "r32.pth")
    out = tmp_path / "r32.pt2"
    cmd = [
        sys.executable,
        "-m",
        "models.export",
        "--dataset",
        "cifar10",
        "--model",
        "ResNet32_DoubleShared",
        "--pretrained",
        ckpt,
        "--out",
        str(out),
        "--batch_size",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "--shared_rank=8 --unique_rank=2" in done.stdout and "dynamic batch" in done.stdout
    assert "params" in done.stdout and "MACs" in done.stdout
    check = next(line for line in done.stdout.splitlines() if line.split()[:1] == ["check"])
    assert check.split()[1:4] == ["passed:", "max", "rel"] and check.index("rel diff") < check.index("abs diff")
    program = torch.export.load(str(out)).module()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _rel(program(x), model(x)) <= 1e-4

    assert E.main(cmd[3:-2] + ["--shared_rank", "16"]) == 1  # in-process: the same CLI, one-line error
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --shared_rank=8 --unique_rank=2" in err


@pytest.mark.slow
def test_cli_reads_dataset_and_model_from_this_projects_checkpoint(tmp_path, capsys):
    """This project's files record dataset, model and ranks: ``--pretrained`` and ``--out`` are enough. The authors'
    spelling ``ResNet32-DoubleShared`` names the same model."""
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=8, unique_rank=2).eval()
    ckpt = _project_file(model, tmp_path / "r32.pth")
    out = tmp_path / "r32.pt2"
    assert E.main(["--pretrained", ckpt, "--out", str(out), "--no_fold"]) == 0
    printed = capsys.readouterr().out
    assert "exported cifar10 ResNet32_DoubleShared --shared_rank=8 --unique_rank=2" in printed
    assert os.path.isfile(out)
    assert E.main(["--pretrained", ckpt, "--out", str(out), "--no_fold", "--model", "ResNet32-DoubleShared"]) == 0
    assert E.main(["--pretrained", ckpt, "--out", str(out), "--model", "ResNet56_DoubleShared"]) == 1
    assert "ResNet32_DoubleShared" in capsys.readouterr().err


@pytest.mark.slow  # about 4 s: every CIFAR-10 layout (ResNet1202 too) is built once to find what the file fits
def test_cli_names_the_flags_an_authors_file_needs(tmp_path, capsys):
    """Issue 27: README's bare export line on an authors' file (no record of dataset or model) must name the
    --dataset and --model flags that fit the file, in this command's spelling, and write nothing."""
    torch.manual_seed(0)
    ckpt = _authors_file(
        get_model("ResNet32_DoubleShared", "cifar10", shared_rank=8, unique_rank=2), tmp_path / "a.pth"
    )
    assert E.main(["--pretrained", ckpt, "--out", str(tmp_path / "a.pt2")]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "--dataset=cifar10 --model=ResNet32_DoubleShared --shared_rank=8 --unique_rank=2" in err
    )
    assert sorted(os.listdir(tmp_path)) == ["a.pth"]
