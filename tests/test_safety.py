"""No run loses an earlier result (issue 25): a run never replaces a checkpoint it did not write, fine-tuning never
writes over its source, and ``--resume=PATH`` scores the test set on the best file of the run it continues. And no
input reaches a traceback: each bad value or file below ends with one line naming it."""

import hashlib
import os

import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar
from models import get_model
from models.pretrained import read_checkpoint
from utils import checkpoint as C
from utils import cli
from utils import train as T

STEM = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"  # the authors' name for the flags below (utils.start.run_stem)


@pytest.fixture(autouse=True)
def _env(monkeypatch, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_fake_cifar(root, "cifar10", n_train=24, n_test=8, seed=0)
    return str(root)


def _train(cifar, out, capsys, *extra):
    argv = [
        "--model=ResNet32_DoubleShared",
        "--shared_rank=1",
        "--unique_rank=1",
        "--epochs=1",
        "--batch_size=8",
        f"--dataset_path={cifar}",
        f"--output_dir={out}",
        "--device=cpu",
        "--num_workers=0",
        *extra,
    ]
    try:
        code = cli.train_main("cifar10", argv)
    except SystemExit as e:  # argparse
        code = e.code
    o, e = capsys.readouterr()
    return code, o, e.strip()


def _one_line(err: str) -> bool:
    return len(err.splitlines()) == 1 and "Traceback" not in err


def digest(directory) -> dict:
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _earlier_checkpoint(path, epoch=2, acc=40.0):
    """A checkpoint of the model the flags above build, as a finished run (or a downloaded file) leaves it."""
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    C.save_checkpoint(C.make_checkpoint(model, sgd, epoch=epoch, acc=acc, best_epoch=epoch), str(path))


# ---------------------------------------------------------------------------------------------------------------------
# No run loses an earlier result
# ---------------------------------------------------------------------------------------------------------------------


def test_a_new_run_never_replaces_an_earlier_checkpoint(cifar, tmp_path, capsys):
    """A best file alone (say the authors' download, under their name) and a best + last pair are both refused in one
    line naming the file and the ways forward; with --overwrite the new run replaces them."""
    out = tmp_path / "out"
    out.mkdir()
    _earlier_checkpoint(out / f"{STEM}.pth")
    before = digest(out)
    code, _, err = _train(cifar, out, capsys)
    assert code == 1 and _one_line(err), err
    assert f"{STEM}.pth" in err and "--overwrite" in err and "another --output_dir" in err
    assert digest(out) == before
    _earlier_checkpoint(out / f"{STEM}-last.pth")
    before = digest(out)
    code, _, err = _train(cifar, out, capsys)
    assert code == 1 and _one_line(err), err
    assert "--resume" in err and "--overwrite" in err
    assert digest(out) == before


@pytest.mark.slow
def test_overwrite_lets_a_new_run_replace_an_earlier_one(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in (f"{STEM}.pth", f"{STEM}-last.pth"):
        _earlier_checkpoint(out / name, epoch=7)
    code, _, err = _train(cifar, out, capsys, "--overwrite")
    assert code == 0, err
    assert read_checkpoint(out / f"{STEM}-last.pth")["epoch"] == 1


def test_fine_tuning_never_writes_over_its_pretrained_source(cifar, tmp_path, capsys):
    """--val_split starts the best score at 0, so epoch 1 would always "improve" onto the source: refused, even with
    --overwrite, before anything is written."""
    out = tmp_path / "out"
    out.mkdir()
    source = out / f"{STEM}.pth"
    _earlier_checkpoint(source)
    before = digest(out)
    for extra in ([], ["--overwrite"]):
        code, _, err = _train(cifar, out, capsys, f"--pretrained={source}", "--val_split=4", *extra)
        assert code == 1 and _one_line(err) and "never writes over its source" in err, err
        assert digest(out) == before


@pytest.mark.slow
def test_resume_into_another_folder_scores_the_best_file_it_continues(cifar, tmp_path, capsys, monkeypatch):
    """--resume=PATH with --val_split into a new --output_dir: the test set is scored on the best file of the run it
    continues (in the old folder) when the resumed epochs do not improve, and so does the "nothing to do" path."""
    real = T.evaluate
    val_top1 = [50.0]  # what every validation pass scores: the first run's epoch is best, the resumed one is not

    def fixed_val(*a, desc="test", **kw):
        r = real(*a, desc=desc, **kw)
        return dict(r, top1=val_top1[0]) if desc == "val" else r

    monkeypatch.setattr(T, "evaluate", fixed_val)
    first = tmp_path / "first"
    code, _, err = _train(cifar, first, capsys, "--val_split=4", "--epochs=1")
    assert code == 0, err
    best = read_checkpoint(first / f"{STEM}.pth")
    assert best["epoch"] == 1 and best["test_acc"] is not None
    second = tmp_path / "second"
    resume = f"--resume={first / (STEM + '-last.pth')}"
    val_top1[0] = 0.0
    code, stdout, err = _train(cifar, second, capsys, "--val_split=4", "--epochs=2", resume)
    assert code == 0, err
    assert "Test_Acc_top1 = %.3f" % best["test_acc"] in stdout and "(epoch 1)" in stdout
    assert not (second / f"{STEM}.pth").exists() and read_checkpoint(second / f"{STEM}-last.pth")["epoch"] == 2
    code, stdout, err = _train(cifar, tmp_path / "third", capsys, "--val_split=4", resume)
    assert code == 0 and "Nothing to do" in stdout, err
    assert "Test_Acc_top1 = %.3f" % best["test_acc"] in stdout
