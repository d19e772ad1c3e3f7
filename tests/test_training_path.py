"""The training path is shallow (issue 24: at most 5 project frames from the script to optimizer.step and to a
checkpoint write), and what a mid-epoch save records survives a resume (bugs 1 and 3 of issue 24)."""

import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar
from models.pretrained import read_checkpoint
from utils import cli

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
STEM = "CIFAR10-ResNet20-S16-U1-L10-0"


@pytest.fixture(autouse=True)
def _env(monkeypatch, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("CI", "1")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_fake_cifar(root, "cifar10", n_train=32, n_test=16, seed=0)
    return str(root)


def _flags(cifar, out, *extra):
    return [
        "--model=ResNet20",
        "--epochs=3",
        "--batch_size=8",
        "--seed=2",
        f"--dataset_path={cifar}",
        f"--output_dir={out}",
        "--device=cpu",
        "--num_workers=0",
        *extra,
    ]


def _project_frames() -> list:
    """The frames of this repository's code (tests excluded) on the current stack, outermost first."""
    frames = []
    for f in traceback.extract_stack():
        if f.filename.startswith("<"):  # <frozen runpy>, <string>
            continue
        path = Path(f.filename).resolve()
        if path.is_relative_to(REPO) and not path.is_relative_to(TESTS) and ".venv" not in path.parts:
            frames.append(f"{path.relative_to(REPO)}:{f.name}")
    return frames


def test_script_to_step_and_to_checkpoint_write_is_at_most_five_frames(cifar, tmp_path, monkeypatch, capsys):
    """Issue 24: torchvision's reference trainer is 3 deep (module -> main -> train_one_epoch); ours was 8."""
    stacks = {"step": [], "write": []}
    step, save = torch.optim.SGD.step, torch.save

    def recording_step(self, *a, **kw):
        stacks["step"].append(_project_frames())
        return step(self, *a, **kw)

    def recording_save(*a, **kw):
        stacks["write"].append(_project_frames())
        return save(*a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    monkeypatch.setattr(torch, "save", recording_save)
    monkeypatch.setattr(sys, "argv", ["train_cifar10.py", *_flags(cifar, tmp_path, "--epochs=1")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "train_cifar10.py"), run_name="__main__")
    assert done.value.code == 0, capsys.readouterr().err
    assert stacks["step"] and stacks["write"]
    deepest = {k: max(v, key=len) for k, v in stacks.items()}
    print("deepest stacks:", deepest)
    assert deepest["step"][0].startswith("train_cifar10.py") and len(deepest["step"]) <= 5, deepest["step"]
    assert len(deepest["write"]) <= 5, deepest["write"]


def _signal_at_training_forward(n: int):
    """A real SIGTERM to this process during the ``n``-th training forward of the network from now on."""
    calls = []

    def hook(module, inputs, output):
        if module.training and getattr(module, "cfg", None) is not None:  # the network, not its layers
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _train(argv, capsys):
    code = cli.train_main("cifar10", argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_resume_with_another_batch_size_continues_at_the_same_sample(cifar, tmp_path, capsys):
    """Bug 1: stopped at sample 16 of epoch 2 with --batch_size=8, resumed with --batch_size=16 (README: changed
    training flags are named in a warning): the epoch goes on from sample 16, so it still sees its 32 images once."""
    handle = _signal_at_training_forward(6)  # 4 steps of 8 per epoch: epoch 2, step 2 -> 16 samples done
    try:
        code, _, err = _train(_flags(cifar, tmp_path), capsys)
    finally:
        handle.remove()
    assert code == 143, err

    seen = []

    def count(module, inputs, output):
        if module.training and getattr(module, "cfg", None) is not None:
            seen.append(inputs[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        code, out, err = _train(_flags(cifar, tmp_path, "--batch_size=16", "--resume"), capsys)
    finally:
        handle.remove()
    assert code == 0, err
    assert "--batch_size 8 -> 16" in err  # the warning names the change
    assert seen == [16, 16, 16]  # the rest of epoch 2 (16 images), then epoch 3 (32 images)
    assert read_checkpoint(str(tmp_path / f"{STEM}-last.pth"))["epoch"] == 3


def test_mid_epoch_save_after_a_resume_keeps_the_last_test_scores(cifar, tmp_path, capsys):
    """Bug 3: a mid-epoch save records the last completed epoch's test top-1 and top-5; after a resume the top-5 was
    recorded as 0.0."""
    handle = _signal_at_training_forward(6)  # epoch 2, step 2
    try:
        assert _train(_flags(cifar, tmp_path), capsys)[0] == 143
    finally:
        handle.remove()
    first = read_checkpoint(str(tmp_path / f"{STEM}-last.pth"))
    assert first["epoch"] == 1 and first["acc5"] > 0  # 16 test images, 10 classes: top-5 of epoch 1 is not 0

    handle = _signal_at_training_forward(1)  # epoch 2, step 3: another mid-epoch save, by the resumed run
    try:
        assert _train(_flags(cifar, tmp_path, "--resume"), capsys)[0] == 143
    finally:
        handle.remove()
    second = read_checkpoint(str(tmp_path / f"{STEM}-last.pth"))
    assert second["epoch"] == 1 and second["epoch_step"] == 3
    for key in ("acc", "acc5", "test_acc", "test_acc5"):
        assert float(second[key]) == float(first[key]), key


def test_resume_of_a_mid_epoch_save_under_another_process_count_is_one_line(cifar, tmp_path, capsys):
    """Bug 1's other half: an epoch's data order depends on the number of processes, so a position saved by 2 cannot
    be continued by 1; refused in one line, before anything is written."""
    handle = _signal_at_training_forward(6)
    try:
        assert _train(_flags(cifar, tmp_path), capsys)[0] == 143
    finally:
        handle.remove()
    last = tmp_path / f"{STEM}-last.pth"
    ckpt = read_checkpoint(str(last))
    torch.save(dict(ckpt, world_size=2), last)  # as two processes would have saved it
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, _, err = _train(_flags(cifar, tmp_path, "--resume"), capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "by 2 process" in err and "resume it with 2" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
