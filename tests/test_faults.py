"""Bad input and faults, tried systematically on all six scripts.

Every malformed command line, dataset layout and checkpoint must end with one line on stderr
(``<script>: error: ...``) naming the problem, a non-zero status (2 for flags, 1 for the rest), no traceback, and no
file of the output folder created, changed or deleted. Signals end a training run with one line, status 130/143 and
the last completed epoch on disk, resumable; a non-finite loss stops the run naming the epoch and step, leaving the
last good checkpoints as they were.

Most cases call the scripts' ``train_main``/``eval_main`` in-process (the same code path as the entry points, minus the
interpreter start); a few subprocess cases prove the real entry points.
"""

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder
from models import get_model
from models import pretrained as P
from utils import checkpoint as C
from utils import cli, engine, run_start, train
from utils import data as D

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
COMMON = ["--device=cpu", "--num_workers=0"]
TRAIN = {"cifar10": "cifar10", "cifar100": "cifar100", "ilsvrc": "ilsvrc"}
EVAL = {"cifar10": "cifar10", "cifar100": "cifar100", "ilsvrc": "ilsvrc"}
SMALL = {"cifar10": "--model=ResNet20", "cifar100": "--model=ResNet18", "ilsvrc": "--model=ResNet18"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """The scripts set CUDA_VISIBLE_DEVICES (restored afterwards); no download is attempted (no network in CI);
    one intra-op thread (model construction runs small QRs that two threads on a busy CPU make 100x slower)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(D, "_try_download", lambda root, dataset: "no network in the tests")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root / "cifar10", "cifar10", n_train=20, n_test=12, seed=0)
    write_fake_cifar(root / "cifar100", "cifar100", n_train=16, n_test=8, seed=0)
    write_fake_imagefolder(root / "ilsvrc", classes=2, per_class=2, size=36, seed=0)
    return {k: str(root / k) for k in ("cifar10", "cifar100", "ilsvrc")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    """Checkpoints good and bad, and an output folder holding an earlier run's files for each dataset."""
    root = tmp_path_factory.mktemp("files")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    r20 = get_model("ResNet20", "cifar10")
    good = root / "resnet20_c10.pth"
    C.save_checkpoint(C.make_checkpoint(r20, None, epoch=1, acc=10.0), str(good))
    shared = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    authors = root / "authors_s2u1.pth"
    torch.save({"net_state_dict": shared.state_dict(), "acc": torch.tensor(10.0), "epoch": 5}, authors)
    garbage = root / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint " * 40)
    empty = root / "empty.pth"
    empty.write_bytes(b"")
    truncated = root / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    folder = root / "a_directory.pth"
    folder.mkdir()
    text = root / "notes.txt"
    text.write_text("not a directory\n")
    weights_list = root / "list.pth"
    torch.save([torch.zeros(3)], weights_list)
    out = root / "out"  # an earlier run of every script, same names as the runs below would write
    for dataset, defaults in TRAIN.items():
        args = cli.parse_train_args(defaults, [SMALL[dataset], f"--output_dir={out}"], prog="x")
        stem = run_start.run_stem(args)
        ckpt = C.make_checkpoint(r20, None, epoch=3, acc=1.0)
        C.save_checkpoint(ckpt, [str(out / f"{stem}.pth"), str(out / f"{stem}-last.pth")])
        (out / f"{stem}-args.json").write_text("{}\n")
    (out / "runs").mkdir()
    (out / "runs" / "events.out").write_bytes(b"tb")
    torch.set_num_threads(threads)
    return {
        "good": good,
        "authors": authors,
        "garbage": garbage,
        "empty": empty,
        "truncated": truncated,
        "folder": folder,
        "text": text,
        "list": weights_list,
        "out": out,
        "root": root,
    }


def digest(directory):
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            p = os.path.join(base, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def call(main, defaults, argv, capsys):
    """``main(defaults, argv)`` in-process: (exit status, stderr stripped, stdout)."""
    try:
        code = main(defaults, [str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, err.strip(), out


def check(results):
    """results: [(label, code, err, expected code, needles)] -> one assertion listing every failure."""
    failures = []
    for label, code, err, rc, needles in results:
        problems = []
        if code != rc:
            problems.append(f"exit {code}, expected {rc}")
        if "Traceback" in err or len(err.splitlines()) != 1:
            problems.append("stderr is not one line")
        elif "error: " not in err:
            problems.append("no 'error: '")
        problems += [f"no {n!r}" for n in needles if n not in err]
        if problems:
            failures.append(f"{label}: {'; '.join(problems)}\n    stderr: {err[-800:]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------------
# Flags (argparse: status 2)
# ---------------------------------------------------------------------------------------------------------------------

BAD_COMMON = [
    (["--batch_size=0"], "--batch_size"),
    (["--batch_size=-8"], "--batch_size"),
    (["--batch_size=abc"], "--batch_size"),
    (["--batch_size=1.5"], "--batch_size"),
    (["--shared_rank=0"], "--shared_rank"),
    (["--shared_rank=-3"], "--shared_rank"),
    (["--shared_rank=x"], "--shared_rank"),
    (["--unique_rank=0"], "--unique_rank"),
    (["--unique_rank=-1"], "--unique_rank"),
    (["--num_workers=-1"], "--num_workers"),
    (["--num_workers=two"], "--num_workers"),
    (["--seed=abc"], "--seed"),
    (["--device=gpu"], "--device"),
    (["--device=cuda:x"], "--device"),
    (["--model=ResNet99"], "valid names"),
    (["--model="], "valid names"),
    (["--visible_device=../x"], "--visible_device"),
    (["--visible_device="], "--visible_device"),
    (["--no_such_flag=1"], "unrecognized"),
]
BAD_TRAIN = [
    (["--lr=nan"], "--lr"),
    (["--lr=inf"], "--lr"),
    (["--lr=-0.1"], "--lr"),
    (["--lr=abc"], "--lr"),
    (["--momentum=nan"], "--momentum"),
    (["--momentum=-1"], "--momentum"),
    (["--weight_decay=inf"], "--weight_decay"),
    (["--weight_decay=-1e-4"], "--weight_decay"),
    (["--lambdaR=nan"], "--lambdaR"),
    (["--lambdaR=-1"], "--lambdaR"),
    (["--epochs=0"], "--epochs"),
    (["--epochs=-5"], "--epochs"),
    (["--epochs=1.5"], "--epochs"),
    (["--starting_epoch=-1"], "--starting_epoch"),
    (["--epochs=3", "--starting_epoch=3"], "--starting_epoch"),
    (["--val_split=-1"], "--val_split"),
    (["--val_split=ten"], "--val_split"),
    (["--resume", "--pretrained=x.pth"], "exclusive"),
]
BAD_EVAL = [([], "--pretrained=<checkpoint> is required"), (["--pretrained="], "--pretrained")]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "ilsvrc"])
def test_malformed_flags(dataset, files, capsys):
    out = files["out"]
    before = digest(out)
    results = []
    for argv, needle in BAD_COMMON + BAD_TRAIN:
        code, err, _ = call(cli.train_main, TRAIN[dataset], [*argv, f"--output_dir={out}", *COMMON], capsys)
        results.append((f"train {dataset} {argv}", code, err, 2, [needle]))
    for argv, needle, pretrained in [(a, n, [f"--pretrained={files['good']}"]) for a, n in BAD_COMMON] + [
        (a, n, []) for a, n in BAD_EVAL
    ]:
        code, err, _ = call(cli.eval_main, EVAL[dataset], [*argv, *pretrained, *COMMON], capsys)
        results.append((f"eval {dataset} {argv}", code, err, 2, [needle]))
    check(results)
    assert digest(out) == before


def test_ranks_that_cannot_build_fail_before_the_data(files, capsys, monkeypatch):
    """ResNeXt's grouped bases need multiples of 4: the authors' script defaults 16/1, given as flags (without them
    the paper's 64/4 is the default), fail at once, naming the paper's ranks, without reading the dataset (which does
    not exist here)."""
    monkeypatch.setattr(D, "load_cifar", lambda *a, **k: pytest.fail("the data was read"))
    argv = ["--model=ResNext50_SingleShared", "--shared_rank=16", "--unique_rank=1", "--dataset_path=/nonexistent"]
    code, err, _ = call(cli.train_main, TRAIN["cifar100"], [*argv, *COMMON, f"--output_dir={files['out']}"], capsys)
    check([("resnext 16/1", code, err, 1, ["multiple of 4", "--shared_rank=64 --unique_rank=4"])])


# ---------------------------------------------------------------------------------------------------------------------
# Dataset layouts (status 1)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("layouts")
    bad = {}
    # CIFAR-10 directory whose batches are CIFAR-100 pickles (no 'labels' key)
    p = root / "c10_with_c100_files"
    shutil.copytree(data["cifar10"], p)
    for f in (p / "cifar-10-batches-py").glob("data_batch_*"):
        shutil.copy(Path(data["cifar100"]) / "cifar-100-python" / "train", f)
    bad["c100 pickles in cifar-10-batches-py"] = (str(p), ["lacks key", "labels"])
    # a garbage training batch
    p = root / "c10_garbage"
    shutil.copytree(data["cifar10"], p)
    (p / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage" * 100)
    bad["garbage data_batch_2"] = (str(p), ["data_batch_2", "not a readable CIFAR"])
    # an empty test batch file
    p = root / "c10_empty_test"
    shutil.copytree(data["cifar10"], p)
    (p / "cifar-10-batches-py" / "test_batch").write_bytes(b"")
    bad["empty test_batch"] = (str(p), ["test_batch"])
    # a valid test batch holding no images: found before training, before anything is written
    p = root / "c10_no_test_images"
    shutil.copytree(data["cifar10"], p)
    with open(p / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": []}, f, protocol=2)
    bad["no test images"] = (str(p), ["test set", "holds no images"])
    bad["ImageFolder tree as CIFAR"] = (data["ilsvrc"], ["not found", "cifar-10-batches-py"])
    bad["a file as dataset_path"] = (
        str(Path(data["cifar10"]) / "cifar-10-batches-py" / "batches.meta"),
        ["is a file, not a folder"],
    )
    return bad


def test_wrong_cifar_layouts(layouts, files, capsys):
    out = files["out"]
    before = digest(out)
    results = []
    for label, (path, needles) in layouts.items():
        code, err, _ = call(
            cli.train_main,
            TRAIN["cifar10"],
            [SMALL["cifar10"], f"--dataset_path={path}", *COMMON, f"--output_dir={out}"],
            capsys,
        )
        results.append((f"train {label}", code, err, 1, needles))
        if label not in ("garbage data_batch_2", "c100 pickles in cifar-10-batches-py"):  # eval reads test_batch only
            code, err, _ = call(
                cli.eval_main,
                EVAL["cifar10"],
                [f"--pretrained={files['good']}", f"--dataset_path={path}", *COMMON],
                capsys,
            )
            results.append((f"eval {label}", code, err, 1, needles))
    check(results)
    assert digest(out) == before


def test_wrong_imagefolder_layouts(data, files, tmp_path, capsys):
    flat = tmp_path / "flat"  # the official val archive: images directly in val/
    shutil.copytree(data["ilsvrc"], flat)
    for f in list((flat / "val").rglob("*.png")):
        f.rename(flat / "val" / f.name)
    for d in (flat / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    fewer = tmp_path / "fewer"  # train/ and val/ with different class folders
    shutil.copytree(data["ilsvrc"], fewer)
    shutil.rmtree(sorted((fewer / "val").iterdir())[0])
    cases = {
        "flat val/": (flat, ["no images in class folders"]),
        "different class folders": (fewer, ["class folders"]),
        "CIFAR tree as ILSVRC": (data["cifar10"], ["not found", "val"]),
        "missing": (tmp_path / "none", ["not found"]),
    }
    out = files["out"]
    before = digest(out)
    results = []
    for label, (path, needles) in cases.items():
        code, err, _ = call(
            cli.train_main,
            TRAIN["ilsvrc"],
            [SMALL["ilsvrc"], f"--dataset_path={path}", *COMMON, f"--output_dir={out}"],
            capsys,
        )
        results.append((f"train {label}", code, err, 1, needles))
    code, err, _ = call(
        cli.train_main,
        TRAIN["ilsvrc"],
        [SMALL["ilsvrc"], f"--dataset_path={data['ilsvrc']}", "--val_split=4", *COMMON, f"--output_dir={out}"],
        capsys,
    )
    results.append(("val_split = all training images", code, err, 1, ["--val_split=4", "all 4 training images"]))
    check(results)
    assert digest(out) == before


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints (status 1)
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_checkpoints(data, files, capsys):
    f, out = files, files["out"]
    unreadable = {
        "garbage": ["not a readable PyTorch checkpoint"],
        "empty": ["the file is empty"],
        "truncated": ["not a readable PyTorch checkpoint"],
        "folder": ["is a directory"],
        "list": ["holds a list"],
        "missing": ["does not exist"],
    }
    f = dict(f, missing=files["root"] / "missing.pth")
    before = digest(out)
    results = []
    for what, needles in unreadable.items():
        for script, (main, defaults, argv) in {
            "eval_cifar10": (cli.eval_main, EVAL["cifar10"], [f"--pretrained={f[what]}"]),
            "eval_ilsvrc": (cli.eval_main, EVAL["ilsvrc"], [f"--pretrained={f[what]}"]),
            "train_cifar100 --pretrained": (
                cli.train_main,
                TRAIN["cifar100"],
                [SMALL["cifar100"], f"--pretrained={f[what]}"],
            ),
            "train_cifar10 --resume=PATH": (
                cli.train_main,
                TRAIN["cifar10"],
                [SMALL["cifar10"], f"--resume={f[what]}"],
            ),
        }.items():
            ds = "cifar100" if "cifar100" in script else "ilsvrc" if "ilsvrc" in script else "cifar10"
            extra = [f"--output_dir={out}"] if main is cli.train_main else []
            code, err, _ = call(main, defaults, [*argv, f"--dataset_path={data[ds]}", *extra, *COMMON], capsys)
            needle = needles if not (what == "missing" and "resume" in script) else ["nothing to resume"]
            results.append((f"{script} {what}", code, err, 1, needle))
    wrong = [
        (
            "another model (eval)",
            cli.eval_main,
            EVAL["cifar10"],
            [f"--pretrained={f['good']}", "--model=ResNet56_DoubleShared"],
            ["holds a ResNet20", "--model=ResNet20"],
        ),
        (
            "another dataset (eval)",
            cli.eval_main,
            EVAL["cifar100"],
            [f"--pretrained={f['good']}"],
            ["trained on cifar10"],
        ),
        (
            "another dataset (train)",
            cli.train_main,
            TRAIN["ilsvrc"],
            [SMALL["ilsvrc"], f"--pretrained={f['good']}"],
            ["trained on cifar10"],
        ),
        (
            "another model (resume)",
            cli.train_main,
            TRAIN["cifar10"],
            ["--model=ResNet32", f"--resume={f['good']}"],
            ["holds a ResNet20"],
        ),
        (
            "authors' file, wrong ranks",
            cli.eval_main,
            EVAL["cifar10"],
            [f"--pretrained={f['authors']}", "--model=ResNet32_DoubleShared", "--shared_rank=4"],
            ["pass --shared_rank=2 --unique_rank=1"],
        ),
        (
            "authors' file, wrong model",
            cli.eval_main,
            EVAL["cifar10"],
            [f"--pretrained={f['authors']}", "--model=ResNet56_DoubleShared"],
            ["--model=ResNet32_DoubleShared --shared_rank=2 --unique_rank=1"],
        ),
        (
            "output_dir is a file",
            cli.train_main,
            TRAIN["cifar10"],
            [SMALL["cifar10"], f"--output_dir={f['text']}"],
            ["exists and is not a directory"],
        ),
    ]
    for label, main, defaults, argv, needles in wrong:
        ds = defaults
        extra = (
            [] if any(a.startswith("--output_dir") for a in argv) or main is cli.eval_main else [f"--output_dir={out}"]
        )
        code, err, _ = call(main, defaults, [*argv, f"--dataset_path={data[ds]}", *extra, *COMMON], capsys)
        results.append((label, code, err, 1, needles))
    check(results)
    assert digest(out) == before
    assert files["text"].read_text() == "not a directory\n"


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite loss and signals (in-process)
# ---------------------------------------------------------------------------------------------------------------------


def _train_argv(data, out, epochs=3):
    return [
        "--model=ResNet32_DoubleShared",
        "--shared_rank=1",
        "--unique_rank=1",
        f"--epochs={epochs}",
        "--batch_size=8",
        f"--dataset_path={data['cifar10']}",
        f"--output_dir={out}",
        "--seed=1",
        *COMMON,
    ]


def _at_epoch(monkeypatch, epoch, action):
    """Run ``action(model)`` when train_one_epoch starts ``epoch`` (counting calls)."""
    real = train.train_one_epoch
    calls = []

    def spy(net, model, loader, optimizer, **kw):
        calls.append(1)
        if len(calls) == epoch:
            action(model)
        return real(net, model, loader, optimizer, **kw)

    monkeypatch.setattr(train, "train_one_epoch", spy)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoints(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    snapshot = {}

    def poison(model):
        snapshot.update(digest(out))
        with torch.no_grad():
            model.fc.weight.fill_(float("nan"))

    _at_epoch(monkeypatch, 2, poison)
    code, err, stdout = call(cli.train_main, TRAIN["cifar10"], _train_argv(data, out), capsys)
    check([("nan", code, err, 1, ["the loss became nan at epoch 2, step 1 of 3", "-last.pth) is intact", "--resume"])])
    assert snapshot and digest(out) == snapshot  # epoch 1's files untouched, nothing of epoch 2 written
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"
    assert P.read_checkpoint(str(out / f"{stem}-last.pth"))["epoch"] == 1
    assert "Basis Epoch: 2" in stdout and "Basis Epoch: 3" not in stdout


def test_nonfinite_loss_is_found_mid_epoch(monkeypatch):
    """The host looks every check_every steps: a nan at step 2 of 6 stops the epoch at step 3, not at its end."""
    model = get_model("ResNet20", "cifar10")
    seen = []

    class Loader:
        def __len__(self):
            return 6

        def __iter__(self):
            for i in range(6):
                seen.append(i)
                x = torch.randn(2, 3, 32, 32)
                if i == 1:
                    x[0, 0, 0, 0] = float("inf")
                yield x, torch.tensor([0, 1])

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.NonFiniteLoss) as e:
        engine.train_one_epoch(
            model, model, Loader(), opt, device=torch.device("cpu"), print_first=False, check_every=3
        )
    assert e.value.step == 2 and e.value.steps == 6 and seen == [0, 1, 2]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_exits_cleanly_and_resumes(data, tmp_path, capsys, monkeypatch, sig, code):
    out = tmp_path / "out"
    handler = signal.getsignal(sig)
    _at_epoch(monkeypatch, 2, lambda model: os.kill(os.getpid(), sig))
    rc, err, _ = call(cli.train_main, TRAIN["cifar10"], _train_argv(data, out), capsys)
    assert rc == code and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(sig).name} during epoch 2: its first 1 of 3 steps are saved" in err
    assert "--resume" in err
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"
    saved = P.read_checkpoint(str(out / f"{stem}-last.pth"))
    assert saved["epoch"] == 1 and saved["epoch_step"] == 1  # epoch 1 complete, 1 step of epoch 2
    assert signal.getsignal(sig) == handler  # the run's handlers are gone
    monkeypatch.undo()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    rc, err, stdout = call(cli.train_main, TRAIN["cifar10"], [*_train_argv(data, out), "--resume"], capsys)
    assert rc == 0, err
    assert "Resuming from" in stdout and "Basis Epoch: 2 (resumed at step 1)" in stdout
    assert "Basis Epoch: 1\n" not in stdout
    assert P.read_checkpoint(str(out / f"{stem}-last.pth"))["epoch"] == 3


def test_signal_while_saving_waits_for_the_files(data, tmp_path, capsys, monkeypatch):
    """SIGTERM arriving while epoch 1's checkpoints are written: both files are completed, then the run ends."""
    out = tmp_path / "out"
    real = train.save_checkpoint
    writes = []

    def save(obj, paths):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered now; the run stops once the files are written
        real(obj, paths)
        writes.append(list(paths))

    monkeypatch.setattr(train, "save_checkpoint", save)
    rc, err, _ = call(cli.train_main, TRAIN["cifar10"], _train_argv(data, out), capsys)
    assert rc == 143 and "interrupted by SIGTERM after epoch 1" in err and len(err.splitlines()) == 1, err
    assert len(writes) == 1
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"
    last = P.read_checkpoint(str(out / f"{stem}-last.pth"))
    assert last["epoch"] == 1
    if len(writes[0]) == 2:  # epoch 1 improved on 0%: the best file is that same epoch
        assert P.read_checkpoint(str(out / f"{stem}.pth"))["epoch"] == 1


def test_stop_signals_first_sets_a_flag_second_stops_at_once():
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with engine.StopSignals() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop() and stop.signum == signal.SIGTERM  # the loops see it at the next step
        with pytest.raises(engine.Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert e.value.exit_code == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---------------------------------------------------------------------------------------------------------------------
# The real entry points (subprocesses)
# ---------------------------------------------------------------------------------------------------------------------


def _proc(args, **kw):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kw
    )


@pytest.mark.slow
def test_entry_points(data, files, tmp_path):
    """Flag, checkpoint and data errors through each script's ``__main__``, and a SIGTERM to a real training run:
    status 143, one line that says what is on disk: the step it stopped at (or the last completed epoch)."""
    out = tmp_path / "sigterm"
    train = [sys.executable, "train_cifar10.py", *_train_argv(data, out, epochs=200)]
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"
    proc = subprocess.Popen(train, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cases = {
        "train_cifar100.py": (["train_cifar100.py", "--lr=nan"], 2, ["--lr"]),
        "train_ilsvrc.py": (["train_ilsvrc.py", "--batch_size=0"], 2, ["--batch_size"]),
        "eval_ilsvrc.py": (["eval_ilsvrc.py", f"--pretrained={files['folder']}", *COMMON], 1, ["is a directory"]),
        "eval_cifar100.py": (["eval_cifar100.py", f"--pretrained={files['empty']}", *COMMON], 1, ["file is empty"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: _proc(c[0]), cases.values())))
    check([(k, results[k].returncode, results[k].stderr.strip(), rc, needles) for k, (_, rc, needles) in cases.items()])

    deadline = time.time() + 240
    last = out / f"{stem}-last.pth"
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    err = stderr.strip()
    assert proc.returncode == 143 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    ckpt = P.read_checkpoint(str(last))
    epoch, step = ckpt["epoch"], ckpt.get("epoch_step") or 0
    said = (
        f"during epoch {epoch + 1}: its first {step} of 3 steps are saved"
        if step
        else f"epoch {epoch} (the last completed)"
    )
    assert epoch >= 1 and said in err, (epoch, step, err)
