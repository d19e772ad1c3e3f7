"""``python -m utils.report``: one row per run, read from the files the runs wrote, matching what training printed."""

import json
import os

import pytest

try:
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar

from utils import cli, report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs in one folder: a plain one (best on test) and a shared one chosen on --val_split."""
    data = tmp_path_factory.mktemp("c10")
    write_fake_cifar(data, "cifar10", n_train=64, n_test=32, seed=0)
    out = tmp_path_factory.mktemp("out")
    common = ["--batch_size=16", f"--dataset_path={data}", f"--output_dir={out}", "--device=cpu", "--num_workers=0"]
    flags = {
        "plain": ["--model=ResNet20", "--epochs=2"],
        "val": [
            "--model=ResNet32_DoubleShared",
            "--shared_rank=2",
            "--unique_rank=1",
            "--lambdaR=5",
            "--epochs=1",
            "--val_split=16",
        ],
    }
    results = {}
    for name, argv in flags.items():
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            assert cli.train_main("cifar10", argv + common) == 0
        results[name] = json.loads(buf.getvalue().strip().splitlines()[-1])
        results[name + " stdout"] = buf.getvalue()
    return out, results


def _rows(capsys, argv):
    code = report.main(argv)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    header = lines[0].split() if lines else []
    return code, lines, header, captured.err


def test_report_has_one_row_per_run_with_the_scores_training_printed(runs, capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    out, results = runs
    code, lines, header, _ = _rows(capsys, [str(out)])
    assert code == 0 and header[:2] == ["run", "model"] and len(lines) == 3
    by_run = {line.split()[0]: line for line in lines[1:]}
    plain = by_run["CIFAR10-ResNet20-S16-U1-L10-0"]
    assert "ResNet20" in plain and " 2/2 " in plain
    assert f"{results['plain']['best_acc']:.2f} (ep {results['plain']['best_epoch']})" in plain
    shared = by_run["CIFAR10-ResNet32_DoubleShared-S2-U1-L5-0"]
    assert shared.split()[1:6] == ["ResNet32_DoubleShared", "2", "1", "5.0", "1/1"]
    assert f"{results['val']['val_acc']:.2f}" in shared and shared.split()[-3] == f"{results['val']['test_acc']:.2f}"
    assert shared.split()[-2][-1] in "sm" and plain.split()[-2][-1] in "sm"  # the runs' training time


def test_report_lists_an_unreadable_run_and_refuses_an_empty_folder(runs, tmp_path, capsys):
    out, _ = runs
    (tmp_path / "Broken-last.pth").write_bytes(b"not a checkpoint")
    code, lines, _, _ = _rows(capsys, [str(out), str(tmp_path / "Broken-last.pth")])
    assert code == 0 and len(lines) == 4 and any(line.startswith("Broken") and "(unreadable)" in line for line in lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _, err = _rows(capsys, [str(empty)])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no checkpoints found" in err
    with pytest.raises(SystemExit, match="does not exist: pass the --output_dir"):
        report.main([str(tmp_path / "missing")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="neither a folder"):
        report.main([str(tmp_path / "notes.txt")])


def test_report_marks_a_run_stopped_inside_an_epoch(runs, tmp_path, capsys):
    import torch

    out, _ = runs
    last = torch.load(os.path.join(out, "CIFAR10-ResNet20-S16-U1-L10-0-last.pth"), weights_only=True)
    last.update(epoch=1, epoch_step=3)
    torch.save(last, tmp_path / "Stopped-last.pth")
    code, lines, _, _ = _rows(capsys, [str(tmp_path)])
    assert code == 0 and " 1/2 +3 steps " in lines[1]


def test_tensorboard_has_step_scalars_and_the_runs_hparams(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = runs
    events = EventAccumulator(os.path.join(out, "runs", "CIFAR10-ResNet32_DoubleShared-S2-U1-L5-0")).Reload()
    tags = events.Tags()
    assert {"step/loss", "step/R", "train/loss", "val/top1"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("step/loss")] == [3]  # 48 training images / 16: one check, at the last step
    hparams = events.PluginTagToContent("hparams")
    session = next(v for k, v in hparams.items() if k.endswith("session_start_info"))
    assert b"lambdaR" in session and b"ResNet32_DoubleShared" in session
    final = events.Scalars("hparam/test_top1")
    assert final[-1].value == pytest.approx(results["val"]["test_acc"])


def test_args_json_and_checkpoints_record_how_to_reproduce_the_run(runs):
    import subprocess

    import torch

    out, _ = runs
    stem = "CIFAR10-ResNet20-S16-U1-L10-0"
    recorded = json.loads((out / f"{stem}-args.json").read_text())["provenance"]
    ckpt = torch.load(out / f"{stem}-last.pth", weights_only=True)
    assert ckpt["provenance"] == recorded and ckpt["train_seconds"] > 0
    assert recorded["paths"]["output_dir"] == os.path.abspath(out) and os.path.isabs(recorded["paths"]["dataset_path"])
    assert recorded["torch"] == str(torch.__version__) and recorded["host"] and "T" in recorded["started"]
    assert {"command", "cwd", "python", "torchvision", "cuda", "cudnn", "git_dirty"} <= set(recorded)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one): the commit the run's code came from
        assert recorded["git_commit"] == head.stdout.strip() and isinstance(recorded["git_dirty"], bool)


def test_a_run_prints_where_its_args_and_tensorboard_logs_go(runs):
    """Issue 27: the printout names the -args.json file and the TensorBoard folder, <output_dir>/runs/<name>."""
    out, results = runs
    stem = "CIFAR10-ResNet20-S16-U1-L10-0"
    line = next(x for x in results["plain stdout"].splitlines() if x.startswith("Run files: "))
    args_json, logs = os.path.join(out, f"{stem}-args.json"), os.path.join(out, "runs", stem)
    assert f" {args_json} " in line and line.endswith(f"TensorBoard logs: {logs}")
    assert os.path.isfile(args_json) and os.listdir(logs)


def test_a_new_run_gets_a_fresh_tensorboard_folder_and_resume_appends(tmp_path):
    """Issue 27 (chosen and documented in README): a rerun does not append to an earlier run's event files."""
    from utils.runlog import tensorboard_dir

    stem, runs_dir = "CIFAR10-ResNet20-S16-U1-L10-0", tmp_path / "runs"
    first = str(runs_dir / stem)
    assert tensorboard_dir(str(tmp_path), stem, resume=False) == first  # nothing there yet
    assert tensorboard_dir(str(tmp_path), stem, resume=True) == first
    os.makedirs(first)
    assert tensorboard_dir(str(tmp_path), stem, resume=False) == first  # an empty folder holds no earlier run
    (runs_dir / stem / "events.out.tfevents.1").write_bytes(b"x")
    assert tensorboard_dir(str(tmp_path), stem, resume=False) == first + "-run2"
    assert tensorboard_dir(str(tmp_path), stem, resume=True) == first
    os.makedirs(first + "-run2")
    (runs_dir / f"{stem}-run2" / "events.out.tfevents.2").write_bytes(b"x")
    assert tensorboard_dir(str(tmp_path), stem, resume=False) == first + "-run3"
    assert tensorboard_dir(str(tmp_path), stem, resume=True) == first + "-run2"  # the run being continued


def test_report_shows_folders_authors_files_and_unreadable_files(runs, tmp_path, capsys, monkeypatch):
    """Issue 27: runs of the same name in two folders are told apart by the folder column, and the authors' files
    are rows (model and ranks read off the shapes, acc, epoch). Issue 25: files that hold no checkpoint dict, or a
    hand-edited args string, are rows; the rest of the table stays."""
    import shutil

    import torch

    from models import get_model

    out, _ = runs
    stem = "CIFAR10-ResNet20-S16-U1-L10-0"
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        shutil.copy(out / f"{stem}-last.pth", tmp_path / folder / f"{stem}-last.pth")
    torch.manual_seed(0)
    authors = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1).state_dict()
    torch.save({"net_state_dict": authors, "acc": torch.tensor(91.5), "epoch": 7}, tmp_path / "a" / "r32_s2u1.pth")
    torch.save([1, 2, 3], tmp_path / "b" / "List-last.pth")
    last = torch.load(out / f"{stem}-last.pth", weights_only=True)
    torch.save(dict(last, args="a string"), tmp_path / "b" / "Edited-last.pth")
    monkeypatch.chdir(tmp_path)
    code, lines, header, _ = _rows(capsys, ["a", "b"])
    assert code == 0 and header[-1] == "folder" and len(lines) == 6
    same = [line.split() for line in lines if line.startswith(stem)]
    assert len(same) == 2 and {row[-1] for row in same} == {"a", "b"} and same[0][1:-1] == same[1][1:-1]
    (row,) = [line.split() for line in lines if line.startswith("r32_s2u1")]
    assert row[1:9] == ["cifar10/ResNet32_DoubleShared", "2", "1", "-", "7", "91.50", "(ep", "7)"]
    assert row[-1] == "a" and "91.50" in row[9:]
    assert any(line.startswith("List") and "(unreadable)" in line for line in lines)
    assert any(line.startswith("Edited") and line.split()[-1] == "b" for line in lines)
