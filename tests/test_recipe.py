"""The paper's optimisation recipe, checked through the training run itself (tests/data/SPEC.md sections 4 and 5).

The step: runs started from the same weights on one batch differ, when only ``--weight_decay`` or only ``--lambdaR``
differs, by exactly what SGD with weight decay on every parameter and the orthogonality regulariser (re-implemented
here from SPEC section 4) predict. The schedule: the learning rate each epoch of a full-length run of each
training script receives.
"""

import os
import runpy
import sys

import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder

from models import get_model
from utils import cli, train
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.engine import pass_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, WD, LAMBDA_R = 0.1, 5e-4, 10.0  # the README command (SPEC section 5)
BLOCKS = 5  # ResNet32: 5 blocks per group, the first of each plain (SPEC section 2.1)


def orthogonality_r(w: dict) -> torch.Tensor:
    """SPEC section 4, CIFAR-10 ``*_DoubleShared``: per group, rows of B are basis ``_1``, basis ``_2``, then each
    shared block's unique conv1 and conv2; the selected entries of D = (B B^T - I)^2 are all of the first n_S rows
    and each unique conv's own diagonal block; R = (sum over groups) / (selected count over groups)."""
    total, count = 0.0, 0
    for g in (1, 2, 3):
        shared = [w[f"shared_basis_{g}_{j}.weight"].flatten(1) for j in (1, 2)]
        unique = [w[f"layer{g}.{i}.basis_conv{j}.weight"].flatten(1) for i in range(1, BLOCKS) for j in (1, 2)]
        b = torch.cat(shared + unique)
        d = (b @ b.t() - torch.eye(b.shape[0], dtype=b.dtype)) ** 2
        n_s = sum(len(s) for s in shared)
        total = total + d[:n_s].sum()
        count += n_s * b.shape[0]
        start = n_s
        for u in unique:
            total = total + d[start : start + len(u), start : start + len(u)].sum()
            count += len(u) ** 2
            start += len(u)
    return total / count


def is_parameter(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def canonical(key: str) -> str:
    """``layer2.3.shared_basis_1.weight`` is an alias of ``shared_basis_2_1.weight`` (README, checkpoints)."""
    parts = key.split(".")
    if len(parts) == 4 and parts[2].startswith("shared_basis_"):
        return f"shared_basis_{parts[0][len('layer') :]}_{parts[2][-1]}.weight"
    return key


@pytest.fixture
def float64():
    """The whole run in float64 (weights, images, loss), so that the differences are exact to rounding."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def test_one_step_differs_by_weight_decay_on_every_parameter_and_by_lambda_r_grad(
    tmp_path, monkeypatch, float64, one_thread
):
    """SPEC section 5: SGD over all parameters in one group (weight decay reaches BN and biases), loss CE + lambdaR R.
    First step, so the momentum buffer is the gradient: a run minus its copy without weight decay is -lr wd W on
    every parameter, and minus its copy with lambdaR=0 is -lr lambdaR dR/dW (zero off the bases)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(train, "provenance", lambda args: {})  # git and version look-ups: slow, and beside the point
    data = write_fake_cifar(tmp_path / "c10", "cifar10", n_train=4, n_test=4, seed=0)
    torch.manual_seed(5)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    with torch.no_grad():  # BN weights away from 1 and biases away from 0, so that decay shows on each
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) / 10)
    start = str(tmp_path / "start.pth")
    save_checkpoint(make_checkpoint(model, None, epoch=0, acc=0.0), start)  # no optimizer state: fresh momentum
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def one_step(name, weight_decay, lambda_r):
        argv = [
            "--model=ResNet32_DoubleShared",
            "--shared_rank=1",
            "--unique_rank=1",
            "--epochs=1",
            "--batch_size=4",  # the whole training set: one step
            f"--lr={LR}",
            "--momentum=0.9",
            f"--weight_decay={weight_decay}",
            f"--lambdaR={lambda_r}",
            f"--pretrained={start}",
            f"--dataset_path={os.path.dirname(data)}",
            f"--output_dir={tmp_path / name}",
            "--device=cpu",
            "--num_workers=0",
        ]
        result = train.fit(cli.parse_train_args("cifar10", argv, prog="train_cifar10.py"))
        state = torch.load(result["last_checkpoint"], weights_only=True)["net_state_dict"]
        assert state["fc.weight"].dtype == torch.float64
        return state

    recipe = one_step("recipe", WD, LAMBDA_R)
    no_decay = one_step("no_decay", 0, LAMBDA_R)
    no_reg = one_step("no_reg", WD, 0)

    leaves = {k: v.clone().requires_grad_(True) for k, v in w0.items() if is_parameter(k) and k == canonical(k)}
    grad_r = dict(zip(leaves, torch.autograd.grad(orthogonality_r(leaves), list(leaves.values()), allow_unused=True)))
    assert sum(g is not None for g in grad_r.values()) == 3 * 2 + 3 * (BLOCKS - 1) * 2  # bases and unique convs

    checked = 0
    for key, w in w0.items():
        if not is_parameter(key):  # BN statistics: the same forward pass in all three runs
            assert torch.equal(recipe[key], no_decay[key]) and torch.equal(recipe[key], no_reg[key]), key
            continue
        decay = -LR * WD * w
        assert decay.abs().max() > 1e-7, key  # a decay that is there to see
        assert torch.allclose(recipe[key] - no_decay[key], decay, rtol=1e-9, atol=1e-15), key
        reg = grad_r[canonical(key)]
        if reg is None:
            assert torch.equal(recipe[key], no_reg[key]), key
        else:
            expected = -LR * LAMBDA_R * reg
            assert expected.abs().max() > 1e-4, key
            assert torch.allclose(recipe[key] - no_reg[key], expected, rtol=1e-9, atol=1e-15), key
        checked += 1
    assert checked == 173 + 3 * (BLOCKS - 1) * 2  # every parameter, and the bases under each alias


def _record_schedule(script, argv, data, tmp_path, monkeypatch, capsys):
    """Run ``script`` as its ``__main__`` for the recipe's full length, the passes replaced by a recorder of what each
    epoch's training pass receives (its optimizer and param groups); no checkpoint is made or written."""
    seen = []

    def record_pass(net, model, loader, optimizer, **kw):
        groups = [
            {k: g[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "dampening")}
            for g in optimizer.param_groups
        ]
        seen.append({"optimizer": optimizer, "groups": groups, "lambda_r": kw.get("lambda_r")})
        totals = [0.0, 0.0, 0.0, 0.0, 1]
        return dict(pass_stats(totals, 0.0, kw.get("regularizer") is not None), steps=len(loader), stopped=False)

    def constant_scores(net, model, loader, **kw):
        return pass_stats([1.0, 0.0, 1, 1, 1], 0.0, False)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(train, "train_one_epoch", record_pass)
    monkeypatch.setattr(train, "evaluate", constant_scores)
    monkeypatch.setattr(train, "make_checkpoint", lambda *args, **kw: {})
    monkeypatch.setattr(train, "save_checkpoint", lambda ckpt, paths: None)
    monkeypatch.setattr(train, "provenance", lambda args: {})
    monkeypatch.setattr(train.RunLog, "open_tensorboard", lambda self, log_dir: None)
    flags = [f"--dataset_path={data}", f"--output_dir={tmp_path / 'out'}", "--device=cpu", "--num_workers=0"]
    monkeypatch.setattr(sys, "argv", [script, *argv, *flags])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    assert done.value.code == 0, capsys.readouterr().err
    return seen, capsys.readouterr().out


# the README's commands (SPEC section 5), --shared_rank 16 shrunk to 1 to build faster (the recipe takes no ranks)
README_FLAGS = ["--lr=0.1", "--momentum=0.9", "--weight_decay=5e-4", "--lambdaR=10", "--shared_rank=1"]
README_FLAGS += ["--unique_rank=1", "--batch_size=256"]


def _paper_lr(epoch: int) -> float:
    """SPEC section 5, CIFAR-10 and CIFAR-100 alike: 0.1 for epochs 1-150, x0.1 for 151-225, x0.01 for 226-300."""
    return 0.1 if epoch <= 150 else 0.01 if epoch <= 225 else 0.001


def _check_sgd(seen, weight_decay=5e-4):
    """SPEC section 5: SGD over one param group, momentum 0.9, no Nesterov, dampening 0, lambdaR 10 every epoch."""
    for epoch, s in enumerate(seen, 1):
        assert isinstance(s["optimizer"], torch.optim.SGD) and len(s["groups"]) == 1, epoch
        g = s["groups"][0]
        assert (g["momentum"], g["weight_decay"], g["nesterov"], g["dampening"]) == (0.9, weight_decay, False, 0), epoch
        assert s["lambda_r"] == 10.0, epoch


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root, "cifar10", n_train=2, n_test=2, seed=0)
    write_fake_cifar(root, "cifar100", n_train=2, n_test=2, seed=0)
    return str(root)


def test_cifar10_run_gets_the_papers_lr_every_epoch(tiny_cifar, tmp_path, monkeypatch, capsys):
    """train_cifar10.py with the README command: 300 epochs at the paper's LR, one SGD throughout (no restart)."""
    argv = ["--model=ResNet56_DoubleShared", *README_FLAGS]
    seen, _ = _record_schedule("train_cifar10.py", argv, tiny_cifar, tmp_path, monkeypatch, capsys)
    assert len(seen) == 300
    assert [s["groups"][0]["lr"] for s in seen] == pytest.approx([_paper_lr(e) for e in range(1, 301)], rel=1e-12)
    _check_sgd(seen)
    assert all(s["optimizer"] is seen[0]["optimizer"] for s in seen)


def test_cifar100_run_gets_the_papers_lr_and_restarts_every_epoch(tiny_cifar, tmp_path, monkeypatch, capsys):
    """train_cifar100.py with the README command: 150 + 75 + 75 epochs at the paper's LR; a new SGD (fresh momentum)
    exactly at the starts of the second and third stages (SPEC section 5 and 10.6)."""
    argv = ["--model=ResNet34_SingleShared", *README_FLAGS]
    seen, out = _record_schedule("train_cifar100.py", argv, tiny_cifar, tmp_path, monkeypatch, capsys)
    assert len(seen) == 300
    assert [s["groups"][0]["lr"] for s in seen] == pytest.approx([_paper_lr(e) for e in range(1, 301)], rel=1e-12)
    _check_sgd(seen)
    new_sgd = [e for e in range(2, 301) if seen[e - 1]["optimizer"] is not seen[e - 2]["optimizer"]]
    assert new_sgd == [151, 226]
    assert "Stage 2 from epoch 151: restarting from" in out and "Stage 3 from epoch 226: restarting from" in out


# SPEC section 5, ILSVRC: "ResNets: lr e <= 60, x0.1 61-100, x0.01 101-140, x0.001 141-150. MobileNetV2_Shared: x0.1
# after 150, 225, 285" (150 and 300 epochs), with the README command's weight decay 1e-4
ILSVRC_LR = {
    "ResNet34_DoubleShared": [0.1] * 60 + [0.01] * 40 + [0.001] * 40 + [0.0001] * 10,
    "MobileNetV2_Shared": [0.1] * 150 + [0.01] * 75 + [0.001] * 60 + [0.0001] * 15,
}


@pytest.mark.parametrize("model", list(ILSVRC_LR))
def test_ilsvrc_run_gets_the_papers_lr_every_epoch(model, tmp_path, monkeypatch, capsys):
    data = write_fake_imagefolder(tmp_path / "in", classes=2, per_class=1, size=32)
    argv = [f"--model={model}", "--lr=0.1", "--momentum=0.9", "--weight_decay=1e-4", "--lambdaR=10", "--shared_rank=1"]
    seen, _ = _record_schedule("train_ilsvrc.py", argv, data, tmp_path, monkeypatch, capsys)
    assert [s["groups"][0]["lr"] for s in seen] == pytest.approx(ILSVRC_LR[model], rel=1e-12)
    _check_sgd(seen, weight_decay=1e-4)
    assert all(s["optimizer"] is seen[0]["optimizer"] for s in seen)
