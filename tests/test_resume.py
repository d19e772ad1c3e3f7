"""A run stopped at any step resumes bit-exact (CPU, fixed seed), with or without DataLoader workers."""

import os
import signal

import pytest
import torch

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar
from models.pretrained import read_checkpoint
from utils import cli
from utils import train as T

STEM = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"


@pytest.fixture(autouse=True)
def _env(monkeypatch, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_fake_cifar(root, "cifar10", n_train=32, n_test=16, seed=0)
    return str(root)


def _train(cifar, out, capsys, *extra, workers=0):
    argv = [
        "--model=ResNet32_DoubleShared",
        "--shared_rank=1",
        "--unique_rank=1",
        "--epochs=3",
        "--batch_size=8",
        "--seed=2",
        f"--dataset_path={cifar}",
        f"--output_dir={out}",
        "--device=cpu",
        f"--num_workers={workers}",
        *extra,
    ]
    code = cli.train_main("cifar10", argv)
    o, e = capsys.readouterr()
    return code, o, e.strip()


def _weights(out):
    ckpt = read_checkpoint(str(out / f"{STEM}-last.pth"))
    return ckpt, ckpt["net_state_dict"]


def _signal_at_forward(monkeypatch, n, sig=signal.SIGTERM):
    """A real signal to this process during the ``n``-th training forward (counted over the run)."""
    real = T.TrainingRun._setup_model
    calls = []

    def setup(self):
        real(self)

        def hook(module, inputs, output):
            if module.training:
                calls.append(1)
                if len(calls) == n:
                    os.kill(os.getpid(), sig)

        self.model.fc.register_forward_hook(hook)

    monkeypatch.setattr(T.TrainingRun, "_setup_model", setup)


def _same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_mid_epoch_saves_that_step_and_resumes_bit_exact(cifar, tmp_path, capsys, monkeypatch, workers):
    code, _, err = _train(cifar, tmp_path / "full", capsys, workers=workers)
    assert code == 0, err
    full_ckpt, full = _weights(tmp_path / "full")

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _signal_at_forward(m, 6)  # epoch 2 (4 steps per epoch), step 2
        code, _, err = _train(cifar, out, capsys, workers=workers)
    assert code == 143 and len(err.splitlines()) == 1, err
    assert "during epoch 2: its first 2 of 4 steps are saved" in err and "--resume" in err
    saved, _ = _weights(out)
    assert saved["epoch"] == 1 and saved["epoch_step"] == 2 and saved["optimizer_state_dict"]["state"]

    code, stdout, err = _train(cifar, out, capsys, "--resume", workers=workers)
    assert code == 0, err
    assert "Basis Epoch: 2 (resumed at step 2)" in stdout and "Basis Epoch: 1\n" not in stdout
    resumed_ckpt, resumed = _weights(out)
    _same(full, resumed)
    for i, s in full_ckpt["optimizer_state_dict"]["state"].items():
        assert torch.equal(s["momentum_buffer"], resumed_ckpt["optimizer_state_dict"]["state"][i]["momentum_buffer"])
    assert resumed_ckpt["best_acc"] == full_ckpt["best_acc"] and resumed_ckpt["best_epoch"] == full_ckpt["best_epoch"]


@pytest.mark.slow
def test_workers_do_not_change_the_run(cifar, tmp_path, capsys):
    """Augmentation is a function of (seed, epoch, sample): 0 and 2 workers train the same weights."""
    assert _train(cifar, tmp_path / "w0", capsys, workers=0)[0] == 0
    assert _train(cifar, tmp_path / "w2", capsys, workers=2)[0] == 0
    _same(_weights(tmp_path / "w0")[1], _weights(tmp_path / "w2")[1])


@pytest.mark.slow
def test_periodic_saves_do_not_change_the_run(cifar, tmp_path, capsys, monkeypatch):
    """--save_every_minutes pauses the pass to write a mid-epoch checkpoint; the run ends as without them."""
    assert _train(cifar, tmp_path / "plain", capsys, "--save_every_minutes=0")[0] == 0
    saves = []
    real = T.save_checkpoint
    monkeypatch.setattr(
        T, "save_checkpoint", lambda obj, paths: (saves.append(obj.get("epoch_step")), real(obj, paths))
    )
    code, _, err = _train(cifar, tmp_path / "often", capsys, "--save_every_minutes=1e-9")  # after every step
    assert code == 0, err
    assert saves.count(0) == 3 and sorted(set(saves) - {0}) == [1, 2, 3]  # 3 epoch ends, steps 1-3 of each epoch
    _same(_weights(tmp_path / "plain")[1], _weights(tmp_path / "often")[1])


# ---------------------------------------------------------------------------------------------------------------------
# The output folder: one writer per run, no debris, true messages
# ---------------------------------------------------------------------------------------------------------------------


def test_a_second_writer_of_the_same_run_is_refused(cifar, tmp_path, capsys):
    from utils.checkpoint import lock_run_files

    out = tmp_path / "out"
    held = lock_run_files(str(out), STEM)  # a live run of the same flags
    try:
        code, _, err = _train(cifar, out, capsys, "--epochs=1")
        assert code == 1 and len(err.splitlines()) == 1 and "another process is writing" in err, err
        assert not (out / f"{STEM}-last.pth").exists() and not (out / f"{STEM}-args.json").exists()
    finally:
        held.close()
    code, _, err = _train(cifar, out, capsys, "--epochs=1")  # released: the run goes ahead
    assert code == 0, err


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    import subprocess
    import sys

    from utils.checkpoint import lock_run_files

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys, time; sys.path.insert(0, {repo!r}); from utils.checkpoint import lock_run_files; "
        f"h = lock_run_files({str(tmp_path)!r}, 'X'); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="another process"):
            lock_run_files(str(tmp_path), "X")
    finally:
        proc.kill()
        proc.wait()
    lock_run_files(str(tmp_path), "X").close()  # SIGKILL released it


def test_stale_temporary_files_of_the_run_are_removed(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    ours = [out / f".{STEM}-last.pth.k3j2h1.tmp", out / f".{STEM}.pth.zz9.tmp", out / f".{STEM}epoch5.pth.a1.tmp"]
    others = [out / f".{STEM},1-last.pth.k3j2h1.tmp", out / "notes.tmp"]  # another run's (GPUs 0,1), a user's file
    for p in ours + others:
        p.write_bytes(b"partial")
    code, _, err = _train(cifar, out, capsys, "--epochs=1")
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)


def test_a_failed_first_save_says_nothing_was_written(cifar, tmp_path, capsys, monkeypatch):
    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "save_checkpoint", full)
    code, _, err = _train(cifar, tmp_path / "out", capsys, "--epochs=1")
    assert code == 1 and len(err.splitlines()) == 1
    assert "No space left on device" in err and "no checkpoint of this run had been written" in err, err


def test_resume_names_changed_flags_and_refuses_other_ranks(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(cifar, out, capsys, "--epochs=1")[0] == 0
    code, _, err = _train(cifar, out, capsys, "--resume", "--lr=0.05", "--batch_size=4")
    assert code == 0 and "differ from the interrupted run's" in err and "--lr 0.1 -> 0.05" in err
    assert "--batch_size 8 -> 4" in err
    code, _, err = _train(cifar, out, capsys, f"--resume={out / (STEM + '-last.pth')}", "--shared_rank=2")
    assert code == 1 and "--shared_rank=1" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("signals, code", [([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)])
def test_signals_to_the_process_group_with_workers_print_one_line(cifar, tmp_path, signals, code):
    """What ``timeout``, Slurm, systemd (SIGTERM) and a terminal (Ctrl-C, here twice) do: signal every process of the
    group, DataLoader workers included. The run ends with one line, no worker traceback."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "train_cifar10.py",
        "--model=ResNet32_DoubleShared",
        "--shared_rank=1",
        "--unique_rank=1",
        "--epochs=500",
        "--batch_size=8",
        f"--dataset_path={cifar}",
        f"--output_dir={out}",
        "--device=cpu",
        "--num_workers=2",
    ]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.Popen(
        argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not (out / f"{STEM}-last.pth").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        for sig in signals:
            os.killpg(proc.pid, sig)
            time.sleep(0.05)
        err = proc.communicate(timeout=120)[1].strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and len(err.splitlines()) == 1 and "interrupted by" in err, err
