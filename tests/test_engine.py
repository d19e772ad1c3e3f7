"""The training layer in-process, on tiny data: one pass, evaluation, the run object, how a run starts."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar

from models import OrthogonalityRegularizer, get_model
from models.regularizer import orthogonality_penalty_reference
from utils import cli
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.data import MEAN_STD, load_cifar
from utils.engine import Precision, RunError, Schedule, evaluate, train_one_epoch
from utils.gpu_loader import GpuCifarLoader
from utils.run_start import decide_start, run_stem

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_fake_cifar(root, "cifar10", n_train=64, n_test=32, seed=0)
    return str(root)


def _loader(cifar, train=True, batch=16, seed=0):
    images, labels = load_cifar(cifar, "cifar10", train, download=False)
    mean, std = MEAN_STD["cifar10"]
    return GpuCifarLoader(images, labels, batch, mean=mean, std=std, train=train, seed=seed)


def test_a_pass_learns_and_reports_counts(cifar, one_thread):
    torch.manual_seed(0)
    model = get_model("ResNet20", "cifar10")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = _loader(cifar)
    losses = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        r = train_one_epoch(model, model, loader, opt, device=CPU, print_first=False)
        assert r["images"] == 64 and r["steps"] == 4 and not r["stopped"] and r["reg"] is None
        losses.append(r["loss"])
    assert losses[-1] < losses[0] * 0.8, losses


def test_a_step_is_the_authors_step_in_float64(cifar, one_thread):
    """Cross-entropy in the model's dtype: a float64 step equals CE + lambda R + SGD written out by hand."""
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1).double()
    ref = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1).double()
    ref.load_state_dict(model.state_dict())
    x, y = next(iter(_loader(cifar)))
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    r = train_one_epoch(
        model,
        model,
        [(x, y)],
        opt,
        device=CPU,
        regularizer=OrthogonalityRegularizer(model),
        lambda_r=10.0,
        print_first=False,
    )
    ref.train()
    ce = F.cross_entropy(ref(x), y)
    loss = ce + 10.0 * orthogonality_penalty_reference(ref, include_unique=True)
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), name
    assert r["loss"] == pytest.approx(ce.item(), rel=1e-12)  # no float32 rounding of the logits


def test_stop_ends_the_pass_at_the_next_step(cifar, one_thread):
    model = get_model("ResNet20", "cifar10")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2

    r = train_one_epoch(model, model, _loader(cifar), opt, device=CPU, stop=stop, print_first=False)
    assert r["stopped"] and r["steps"] == 2 and r["images"] == 32


def test_evaluate_counts_match_a_direct_computation(cifar, one_thread):
    torch.manual_seed(1)
    model = get_model("ResNet20", "cifar10").eval()
    loader = _loader(cifar, train=False, batch=10)
    r = evaluate(model, model, loader, device=CPU)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    assert r["images"] == 32
    assert r["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    top5 = logits.topk(5, 1).indices.eq(y[:, None]).any(1).float().mean().item()
    assert r["top5"] == pytest.approx(100.0 * top5)
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    with pytest.raises(RunError, match="empty"):
        evaluate(model, model, [], device=CPU)


def test_bf16_pass_keeps_fp32_master_weights(cifar, one_thread):
    model = get_model("ResNet20", "cifar10")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    from utils.engine import wrap_model

    precision = Precision(torch.bfloat16)
    r = train_one_epoch(
        wrap_model(model, CPU, precision),
        model,
        _loader(cifar),
        opt,
        device=CPU,
        precision=precision,
        print_first=False,
    )
    assert torch.isfinite(torch.tensor(r["loss"])) and model.fc.weight.dtype == torch.float32


def _args(cifar, out, *extra):
    return cli.parse_train_args(
        "cifar10",
        [
            "--model=ResNet20",
            "--epochs=2",
            "--batch_size=16",
            f"--dataset_path={cifar}",
            f"--output_dir={out}",
            "--device=cpu",
            "--num_workers=0",
            *extra,
        ],
        prog="t",
    )


def test_decide_start(cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    sch = Schedule.from_recipe(0.1, {"recipe_epochs": 300, "milestones": [150, 225]}, epochs=2)
    fresh = decide_start(_args(cifar, tmp_path, "--starting_epoch=1"), "none.pth", sch)
    assert fresh.kind == "fresh" and fresh.ckpt is None and fresh.state.epoch == 1
    model = get_model("ResNet20", "cifar10")
    path = str(tmp_path / "c.pth")
    save_checkpoint(make_checkpoint(model, None, epoch=1, acc=42.0, best_acc=42.0, best_epoch=1, stage=0), path)
    pre = decide_start(_args(cifar, tmp_path, f"--pretrained={path}"), "none.pth", sch)
    assert pre.kind == "pretrained" and pre.state.best_acc == 42.0 and pre.state.epoch == 0
    res = decide_start(_args(cifar, tmp_path, f"--resume={path}"), "none.pth", sch)
    assert res.kind == "resume" and res.state.epoch == 1 and res.state.best_epoch == 1 and res.path == path
    with pytest.raises(RunError, match="nothing to resume"):
        decide_start(_args(cifar, tmp_path, "--resume"), str(tmp_path / "missing.pth"), sch)
    with pytest.raises(RunError, match="--val_split=0"):
        decide_start(_args(cifar, tmp_path, f"--resume={path}", "--val_split=4"), "none.pth", sch)


def test_fit_then_evaluate_in_process(cifar, tmp_path, monkeypatch, capsys, one_thread):
    """The run object end to end (2 epochs), and the eval run reproduces the accuracy training reported."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")
    argv = [
        "--model=ResNet20",
        "--epochs=2",
        "--batch_size=16",
        f"--dataset_path={cifar}",
        f"--output_dir={tmp_path}",
        "--device=cpu",
        "--num_workers=0",
    ]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert cli.train_main("cifar10", argv) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs"] == 2 and result["last_checkpoint"].endswith("-last.pth")
    best = result["best_checkpoint"] or result["last_checkpoint"]
    assert (
        cli.eval_main(
            "cifar10",
            [f"--pretrained={best}", "--batch_size=16", f"--dataset_path={cifar}", "--device=cpu", "--num_workers=0"],
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["top1"] == pytest.approx(result["best_acc"]) and report["top5"] == pytest.approx(result["best_acc5"])
    assert report["paper_row"] is None  # ResNet20 is in no table of the paper
    assert run_stem(_args(cifar, tmp_path)) == "CIFAR10-ResNet20-S16-U1-L10-0"


def test_eval_refuses_non_finite_weights_and_prints_strict_json(cifar, tmp_path, capsys):
    from utils.engine import json_line

    model = get_model("ResNet20", "cifar10")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    path = str(tmp_path / "diverged.pth")
    save_checkpoint(make_checkpoint(model, None, epoch=3, acc=10.0), path)
    code = cli.eval_main(
        "cifar10", [f"--pretrained={path}", f"--dataset_path={cifar}", "--device=cpu", "--num_workers=0"]
    )
    out, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 1 and "non-finite weights (fc.weight)" in err, err
    assert "Eval_Acc" not in out
    line = json_line({"loss": float("nan"), "nested": {"top1": float("inf")}, "n": 3})
    assert json.loads(line) == {"loss": None, "nested": {"top1": None}, "n": 3} and "NaN" not in line
