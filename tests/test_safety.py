"""No run loses an earlier result (issue 25): a run never replaces a checkpoint it did not write, fine-tuning never
writes over its source, and ``--resume=PATH`` scores the test set on the best file of the run it continues. And no
input reaches a traceback: each bad value or file below ends with one line naming it."""

import hashlib
import os
import pickle
import shutil
import signal
import time
import warnings

import numpy as np
import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder
from models import get_model
from models import pretrained as P
from models.pretrained import read_checkpoint
from utils import checkpoint as C
from utils import cli, engine
from utils import data as D
from utils import train as T

STEM = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"  # the authors' name for the flags below (utils.run_start.run_stem)


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


def test_other_files_of_the_same_name_are_guarded_too(cifar, tmp_path, capsys):
    """An ILSVRC-style periodic file alone; --resume=PATH of a run elsewhere into a folder holding other files of the
    same name; and a live run of the same name is named as such (its lock), not as an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    _earlier_checkpoint(out / f"{STEM}epoch5.pth")
    code, _, err = _train(cifar, out, capsys)
    assert code == 1 and _one_line(err) and f"{STEM}epoch5.pth" in err and "--overwrite" in err, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _resumable(elsewhere / f"{STEM}-last.pth")
    _earlier_checkpoint(out / f"{STEM}-last.pth")
    before = digest(out)
    code, _, err = _train(cifar, out, capsys, f"--resume={elsewhere / (STEM + '-last.pth')}", "--epochs=3")
    assert code == 1 and _one_line(err) and f"{STEM}-last.pth" in err and "another --output_dir" in err, err
    assert digest(out) == before
    held = C.lock_run_files(str(out), STEM)
    try:
        code, _, err = _train(cifar, out, capsys)
    finally:
        held.close()
    assert code == 1 and _one_line(err) and "another process is writing" in err, err


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


# ---------------------------------------------------------------------------------------------------------------------
# Numbers out of range and hand-edited checkpoints: one line, before anything is written
# ---------------------------------------------------------------------------------------------------------------------

F32_MAX = "3.4028234663852886e38"  # torch.finfo(torch.float32).max, written out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lr=1e39"], "--lr"),  # finite, above float32: overflowed at the first SGD step
        (["--weight_decay=1e300"], "--weight_decay"),
        (["--momentum=1e39"], "--momentum"),
        (["--lambdaR=1e39"], "--lambdaR"),
        (["--batch_size=99999999999999999999"], "--batch_size"),  # above sys.maxsize: itertools.islice refused it
        (["--seed=99999999999999999999"], "--seed"),  # torch.manual_seed: "Overflow when unpacking long long"
        (["--seed=18446744073709551615"], "--seed"),  # 2**64-1: torch took it, the sampler's seed + epoch did not
        (["--seed=-1"], "--seed"),
    ],
)
def test_numbers_beyond_what_torch_and_python_take_are_refused_as_flags(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args("cifar10", [*argv, f"--output_dir={tmp_path}"], prog="t")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and _one_line(err) and f"argument {flag}" in err, err
    if flag in ("--batch_size", "--seed"):
        with pytest.raises(SystemExit):
            cli.parse_eval_args("cifar10", [*argv, "--pretrained=x.pth"], prog="t")
    assert not os.listdir(tmp_path)


def test_the_largest_accepted_numbers_parse():
    args = cli.parse_train_args(
        "cifar10", [f"--lr={F32_MAX}", "--batch_size=9223372036854775807", "--seed=4294967295"], prog="t"
    )
    assert args.lr == float(F32_MAX) and args.batch_size == 2**63 - 1 and args.seed == 2**32 - 1


_BASE = []


def _resumable(path, **fields):
    """A -last.pth as a run saves it after epoch 1 (or inside epoch ``epoch + 1`` with ``epoch_step``), then edited."""
    if not _BASE:
        torch.manual_seed(0)
        model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rng = C.capture_rng_state()
        _BASE.append(C.make_checkpoint(model, sgd, epoch=1, acc=10.0, best_acc=10.0, best_epoch=1, rng_state=rng))
    torch.save({**_BASE[0], "stage": 0, "args": {}, **fields}, path)  # as a hand-edit would: not save_checkpoint


HAND_EDITS = [
    ("epoch", -5),  # was accepted: trained epochs -4..3
    ("epoch", "3"),
    ("stage", 1.5),
    ("best_epoch", "two"),
    ("best_acc", float("nan")),
    ("val_split", "4"),
    ("val_split", {"n": -1}),
    ("args", "--lr=0.1"),
    ("rng_state", [1, 2, 3]),
    ("rng_state", {"torch": torch.zeros(3)}),
    ("rng_states", [{"numpy": {"kind": "MT19937"}}]),
    ("epoch_totals", [1.0, 2.0]),
    ("epoch_totals", "x"),
    ("epoch_step", -1),
    ("train_seconds", -1.0),
    ("model_kwargs", {"shared_rank": "1"}),
    ("model", ["ResNet32_DoubleShared"]),
    ("dataset", 5),
]


def test_a_hand_edited_field_is_refused_as_the_file_is_read(tmp_path):
    path = tmp_path / "edited.pth"
    failures = []
    for key, value in HAND_EDITS:
        _resumable(path, **{key: value})
        try:
            P.read_checkpoint(path)
            failures.append(f"{key}={value!r} was accepted")
        except P.CheckpointError as e:
            if f"records {key}=" not in str(e) or "altered" not in str(e) or "\n" in str(e):
                failures.append(f"{key}={value!r}: {e}")
    assert not failures, "\n".join(failures)
    _resumable(path)
    assert P.read_checkpoint(path)["epoch"] == 1  # unedited: read as it is


def test_resume_of_a_hand_edited_epoch_is_one_line(cifar, tmp_path, capsys):
    """epoch=-5 was accepted and trained epochs -4..3."""
    out = tmp_path / "out"
    out.mkdir()
    _resumable(out / f"{STEM}-last.pth", epoch=-5)
    before = digest(out)
    code, _, err = _train(cifar, out, capsys, "--resume", "--epochs=3")
    assert code == 1 and _one_line(err) and "records epoch=-5" in err, err
    assert digest(out) == before


def test_eval_of_a_file_whose_model_is_a_list_is_one_line(cifar, tmp_path, capsys):
    path = tmp_path / "edited.pth"
    _resumable(path, model=["ResNet32_DoubleShared"])
    try:
        code = cli.eval_main("cifar10", [f"--pretrained={path}", f"--dataset_path={cifar}", "--device=cpu"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 1 and _one_line(err) and "records model=" in err, err


def test_a_mid_epoch_position_beyond_the_dataset_is_one_line(cifar, tmp_path, capsys):
    """Saved at step 5 of an epoch of a larger dataset; the 24 images here make 3 steps of 8."""
    out = tmp_path / "out"
    out.mkdir()
    _resumable(out / f"{STEM}-last.pth", epoch=1, epoch_step=5, epoch_totals=[1.0, 0.0, 1.0, 2.0, 40.0])
    before = digest(out)
    code, _, err = _train(cifar, out, capsys, "--resume", "--epochs=3")
    assert code == 1 and _one_line(err) and "step 5 of epoch 2" in err and "only 3 steps" in err, err
    assert digest(out) == before


# ---------------------------------------------------------------------------------------------------------------------
# Data trees and output folders that used to reach a traceback
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_fake_imagefolder(root, classes=2, per_class=2, size=36, seed=0)
    return root


def test_hidden_folders_and_files_are_no_classes_or_images(tree, tmp_path):
    """A notebook's train/.ipynb_checkpoints/ (and macOS ._ files) are not data, as users expect of a folder tree."""
    from PIL import Image

    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    for split in ("train", "val"):
        hidden = root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.new("RGB", (36, 36)).save(hidden / "x.png")
        (root / split / "n00000000" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
        (root / split / "n00000000" / ".cache").mkdir()
        Image.new("RGB", (36, 36)).save(root / split / "n00000000" / ".cache" / "y.png")
    loaders = D.build_loaders("ilsvrc", str(root), 8, num_workers=0, device=torch.device("cpu"))
    assert loaders.num_classes == 2  # n00000000 and n00000001
    assert len(loaders.train.dataset) == 4 and len(loaders.test.dataset) == 4  # 2 classes x 2 images, each split
    for x, _ in loaders.train:  # the AppleDouble file would be an unreadable image
        assert x.shape[0] == 4


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_decompression_bomb_is_one_line_naming_the_file(tree, tmp_path, capsys, monkeypatch, workers):
    """PIL refuses images above twice Image.MAX_IMAGE_PIXELS (a security guard that stays on); lowered here so that a
    64x64 PNG stands in for a 20000x20000 one."""
    from PIL import Image

    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    bomb = root / "train" / "n00000001" / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 36x36 = 1296 pixels pass, 64x64 = 4096 > 2 x 1500
    out = tmp_path / "out"
    argv = ["--model=ResNet18", "--epochs=1", "--batch_size=8", f"--dataset_path={root}", f"--output_dir={out}"]
    code = cli.train_main("ilsvrc", [*argv, "--device=cpu", f"--num_workers={workers}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and _one_line(err) and str(bomb) in err and "DecompressionBombError" in err, err
    assert Image.MAX_IMAGE_PIXELS == 1500  # the guard was not turned off


def test_a_runs_path_that_is_a_file_is_refused_before_anything_is_written(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").write_text("not a folder\n")
    before = digest(out)
    code, _, err = _train(cifar, out, capsys)
    assert code == 1 and _one_line(err) and "runs" in err and "not a directory" in err, err
    assert digest(out) == before


# ---------------------------------------------------------------------------------------------------------------------
# One-liners that say what is true
# ---------------------------------------------------------------------------------------------------------------------


def test_sigint_during_eval_does_not_advise_resume(cifar, tmp_path, capsys, monkeypatch):
    """Eval has no --resume and writes nothing."""
    from utils import evaluate as E

    path = tmp_path / "c.pth"
    _earlier_checkpoint(path)

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "evaluate", ctrl_c)
    code = cli.eval_main("cifar10", [f"--pretrained={path}", f"--dataset_path={cifar}", "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and _one_line(err) and "interrupted" in err and "--resume" not in err, err


def _refusal(path) -> str:
    with pytest.raises(P.CheckpointError) as e:
        P.read_checkpoint(path)
    return str(e.value)


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path):
    """A pickled whole model and random bytes: one plain line each, never the advice to load with
    weights_only=False (which runs whatever the file holds), no terminal colour codes."""
    whole = tmp_path / "whole.pth"
    torch.save(get_model("ResNet20", "cifar10"), whole)
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    pickled = tmp_path / "plain.pkl"  # pickle protocol 4: torch warns about it before failing
    pickled.write_bytes(pickle.dumps({"weights": np.zeros(3)}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line on the scripts' stderr
        messages = {p: _refusal(p) for p in (whole, noise, pickled)}
    for p, message in messages.items():
        assert "\n" not in message and "\x1b" not in message and "weights_only" not in message, (p, message)
    assert "pickled Python objects (models.resnet.ResNet" in messages[whole] and "state_dict()" in messages[whole]
    assert "not a readable PyTorch checkpoint" in messages[noise]


@pytest.mark.parametrize("content", [b"hello world\n", b"<!DOCTYPE html><html><title>Quota exceeded</title>"])
def test_a_text_file_given_as_checkpoint_says_it_is_text(tmp_path, content):
    path = tmp_path / "note.pth"
    path.write_bytes(content)
    message = _refusal(path)
    assert "\n" not in message and "KeyError" not in message and "is not a readable PyTorch checkpoint (text" in message


@pytest.mark.slow
def test_an_exported_program_given_as_checkpoint_says_so(tmp_path):
    model = get_model("ResNet20", "cifar10").eval()
    pt2 = tmp_path / "r20.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), pt2)
    message = _refusal(pt2)
    assert "torch.export program" in message and "not a checkpoint" in message and "corrupted" not in message


def test_a_dataset_record_that_is_no_dataset_names_the_field(tmp_path):
    path = tmp_path / "c.pth"
    _resumable(path, dataset=5)
    message = _refusal(path)
    assert "records dataset=5" in message and "cifar10" in message and "5 scripts" not in message, message


def test_load_model_names_a_wrong_argument_in_python_terms(tmp_path):
    path = tmp_path / "c.pth"
    _earlier_checkpoint(path)
    with pytest.raises(ValueError) as e:
        P.load_model(path, shared_rank="1")
    assert str(e.value) == "shared_rank must be a positive integer, got '1'"


def test_after_pretrained_with_no_improvement_the_epoch_line_names_the_source(capsys):
    from types import SimpleNamespace

    from utils.runlog import RunLog

    log = RunLog(SimpleNamespace(val_split=0, dataset="cifar10"), "test", 3)
    scores = {"loss": 1.0, "reg": None, "top1": 10.0, "top5": 50.0, "img_per_s": 100.0}
    log.epoch_line(1, 0, 0.1, scores, scores, (40.0, 90.0, None), 1.0)
    line = capsys.readouterr().out.splitlines()[-1]
    assert "best 40.00 (--pretrained)" in line and "None" not in line, line


# ---------------------------------------------------------------------------------------------------------------------
# Decided and documented: SIGHUP, --starting_epoch alone, num_classes
# ---------------------------------------------------------------------------------------------------------------------


def test_sighup_is_a_stop_like_sigterm():
    """A dropped ssh session or a closed terminal: save and stop (status 129), not a kill with nothing saved."""
    previous = signal.getsignal(signal.SIGHUP)
    with engine.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        assert stop() and stop.signum == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) == previous
    assert engine.Interrupted(signal.SIGHUP).exit_code == 129


@pytest.mark.slow
def test_sighup_during_training_saves_and_resumes(cifar, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = T.train_one_epoch

    def hang_up(*a, **kw):
        os.kill(os.getpid(), signal.SIGHUP)
        return real(*a, **kw)

    monkeypatch.setattr(T, "train_one_epoch", hang_up)
    code, _, err = _train(cifar, out, capsys, "--epochs=2")
    assert code == 129 and _one_line(err) and "interrupted by SIGHUP during epoch 1" in err and "--resume" in err, err
    assert read_checkpoint(out / f"{STEM}-last.pth")["epoch_step"] == 1
    monkeypatch.setattr(T, "train_one_epoch", real)
    code, stdout, err = _train(cifar, out, capsys, "--epochs=2", "--resume")
    assert code == 0 and "(resumed at step 1)" in stdout, err


def test_starting_epoch_without_pretrained_is_said(capsys):
    cli.parse_train_args("cifar10", ["--starting_epoch=200"], prog="t")
    err = capsys.readouterr().err.strip()
    assert _one_line(err) and "--starting_epoch=200 without --pretrained" in err and "random weights" in err, err
    cli.parse_train_args("cifar10", ["--starting_epoch=200", "--pretrained=x.pth"], prog="t")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("classes", [0, -3, 2.5, True])
def test_get_model_refuses_a_head_without_outputs(classes):
    with pytest.raises(ValueError, match=rf"num_classes must be a positive integer, got {classes!r}"):
        get_model("ResNet20", "cifar10", num_classes=classes)
