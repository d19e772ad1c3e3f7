"""The six scripts end to end, run as a user runs them (subprocesses, CPU, tiny fake datasets on disk).

Covers: training writes best + last checkpoints and the authors' printed lines; the eval script reproduces the
training's test accuracy from our files, from the authors' four-key files and from ``module.``-prefixed ones (ranks
read off the shapes when not given); an interrupted run resumed with ``--resume`` ends with exactly the weights of
an uninterrupted one; the CIFAR-100 stages restart from the best weights with a fresh optimizer; bad inputs end with
one line on stderr, a non-zero status, no traceback, and leave existing checkpoints byte-identical.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models import get_model

try:  # importable both as a package module and from the tests/ directory
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder

REPO = Path(__file__).resolve().parents[1]
# CI=1 turns the progress bars off; one intra-op thread makes CPU results independent of the machine's core count
# (the resume test compares weights bit for bit) and is faster for these tiny batches on a busy CPU.
ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
COMMON = ["--device=cpu", "--num_workers=0"]
SHARED = ["--model=ResNet32_DoubleShared", "--shared_rank=1", "--unique_rank=1"]


def run(args, rc=0, timeout=600):
    """Run ``python <args>`` in the repository root; check the exit status (None: any)."""
    p = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if rc is not None:
        assert p.returncode == rc, (
            f"{' '.join(map(str, args))}\nexit {p.returncode}, expected {rc}\n"
            f"--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
        )
    return p


def value(stdout, label):
    """The last ``label = <number>`` printed (as text, to compare exactly what the user sees)."""
    found = re.findall(rf"^{re.escape(label)} = (\S+)$", stdout, re.M)
    assert found, f"no '{label} = ' line in:\n{stdout[-2000:]}"
    return found[-1]


def json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def digest(directory):
    """Every file under ``directory`` (TensorBoard's runs/ too) -> its hash."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def authors_format(ckpt, prefix=""):
    """The authors' checkpoint: four keys, optionally DataParallel's ``module.`` prefix."""
    return {
        "net_state_dict": {prefix + k: v for k, v in ckpt["net_state_dict"].items()},
        "optimizer_state_dict": ckpt["optimizer_state_dict"],
        "acc": ckpt["acc"],
        "epoch": ckpt["epoch"],
    }


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root / "c10", "cifar10", n_train=32, n_test=32, seed=0)
    write_fake_cifar(root / "c100", "cifar100", n_train=16, n_test=16, seed=0)
    write_fake_imagefolder(root / "in", classes=3, per_class=2, size=40, seed=0)
    return {"c10": str(root / "c10"), "c100": str(root / "c100"), "in": str(root / "in")}


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10: train, evaluate, resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_runs(data, tmp_path_factory):
    """ResNet32_DoubleShared (s1, u1), 3 epochs: once straight through, once interrupted after epoch 2 + resumed."""
    root = tmp_path_factory.mktemp("runs")
    flags = [
        *SHARED,
        "--epochs=3",
        "--batch_size=16",
        "--lr=0.1",
        "--momentum=0.9",
        "--weight_decay=5e-4",
        "--lambdaR=10",
        "--seed=3",
        f"--dataset_path={data['c10']}",
        *COMMON,
    ]
    full = run(["train_cifar10.py", *flags, f"--output_dir={root / 'full'}"])
    # A real SIGINT (Ctrl-C) right after epoch 2's checkpoints were written.
    stop_after_2 = (
        "import os, runpy, signal, sys\n"
        "import utils.train as t\n"
        "orig = t.TrainingRun.save\n"
        "def stop(self, ckpt, paths, epoch=None):\n"
        "    orig(self, ckpt, paths, epoch)\n"
        "    if epoch == 2:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "t.TrainingRun.save = stop\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    interrupted = run(["-c", stop_after_2, "train_cifar10.py", *flags, f"--output_dir={root / 'resumed'}"], rc=130)
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"
    after_interrupt = load(root / "resumed" / f"{stem}-last.pth")
    resumed = run(["train_cifar10.py", *flags, f"--output_dir={root / 'resumed'}", "--resume"])
    return {
        "root": root,
        "stem": stem,
        "full": full,
        "interrupted": interrupted,
        "resumed": resumed,
        "after_interrupt": after_interrupt,
        "flags": flags,
    }


@pytest.mark.slow
def test_cifar10_train_then_eval(data, tmp_path):
    out = tmp_path / "out"
    p = run(
        [
            "train_cifar10.py",
            "--model=ResNet20",
            "--epochs=2",
            "--batch_size=16",
            "--lambdaR=10",
            f"--dataset_path={data['c10']}",
            f"--output_dir={out}",
            *COMMON,
        ]
    )
    # the authors' lines (ResNet20 has no shared bases: "Epoch", not "Basis Epoch")
    for line in (
        "\nEpoch: 1",
        "\nEpoch: 2",
        "Training_Acc_Top1 = ",
        "Training_Acc_Top5 = ",
        "accuracy_loss: ",
        "Time:  ",
        "Best_Acc_top5 = ",
    ):
        assert line in p.stdout
    assert "Cuda" not in p.stdout and "ETA " in p.stdout  # the authors' "Cuda N" prefix only on GPUs
    improved = [e == b for e, b in re.findall(r"\[epoch (\d+)/2\].*\| best [\d.]+ \(epoch (\w+)\)", p.stdout)]
    assert len(improved) == 2  # the final best is printed once: not again when the last epoch just printed it
    assert p.stdout.count("Best_Acc_top1 = ") == sum(improved) + (not improved[-1])
    assert "similarity loss" not in p.stdout
    result = json_line(p.stdout)
    stem = "CIFAR10-ResNet20-S16-U1-L10-0"  # --lambdaR=10 gives L10 (the authors' script wrote L10.0)
    best, last = out / f"{stem}.pth", out / f"{stem}-last.pth"
    assert result["best_checkpoint"] == str(best) and best.is_file() and last.is_file()
    args = json.loads((out / f"{stem}-args.json").read_text())
    # 150/225 of 300 in 2 epochs: one step after epoch 1; the third stage gets no epoch and is dropped
    assert args["epochs"] == 2 and args["milestones"] == [1] and args["model"] == "ResNet20"
    assert (out / "runs" / stem).is_dir()  # TensorBoard events

    ckpt = load(best)
    assert ckpt["epoch"] == result["best_epoch"] and ckpt["model"] == "ResNet20" and ckpt["dataset"] == "cifar10"
    assert ckpt["acc"].dim() == 0 and "%.3f" % float(ckpt["acc"]) == value(p.stdout, "Best_Acc_top1")
    assert load(last)["epoch"] == 2

    # the eval script rebuilds the model from the checkpoint and prints exactly the training's best top-1
    e = run(["eval_cifar10.py", f"--pretrained={best}", "--batch_size=16", f"--dataset_path={data['c10']}", *COMMON])
    assert value(e.stdout, "Eval_Acc_top1") == value(p.stdout, "Best_Acc_top1")
    assert value(e.stdout, "Eval_Acc_top5") == value(p.stdout, "Best_Acc_top5")
    assert "%.3f" % (100 - float(value(e.stdout, "Eval_Acc_top1"))) == value(e.stdout, "Eval_Err_top1")
    report = json_line(e.stdout)
    assert report["model"] == "ResNet20" and report["images"] == 32 and report["params"] == 269722

    # the authors' four-key file with DataParallel's "module." prefix, evaluated with the README's flags
    ref = tmp_path / "authors.pth"
    torch.save(authors_format(ckpt, "module."), ref)
    e = run(
        [
            "eval_cifar10.py",
            f"--pretrained={ref}",
            "--model=ResNet20",
            "--batch_size=16",
            f"--dataset_path={data['c10']}",
            *COMMON,
        ]
    )
    assert value(e.stdout, "Eval_Acc_top1") == value(p.stdout, "Best_Acc_top1")


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(shared_runs):
    r, stem = shared_runs, shared_runs["stem"]
    assert r["interrupted"].stderr.strip().count("\n") == 0 and "--resume" in r["interrupted"].stderr
    assert r["after_interrupt"]["epoch"] == 2 and r["after_interrupt"]["stage"] == 1
    best = value(r["interrupted"].stdout, "Best_Acc_top1") if "Best_Acc_top1" in r["interrupted"].stdout else "0.000"

    out = r["resumed"].stdout
    assert f"(epoch 2, stage 2, best test top-1 {best})" in out
    assert "Basis Epoch: 3" in out and "Epoch: 1\n" not in out and "Epoch: 2\n" not in out
    assert "[epoch 3/3] stage 3 lr 0.001 " in out  # the same LR stage as the uninterrupted run's epoch 3
    assert "[epoch 3/3] stage 3 lr 0.001 " in r["full"].stdout
    assert value(out, "Best_Acc_top1") == value(r["full"].stdout, "Best_Acc_top1")

    a = load(r["root"] / "full" / f"{stem}-last.pth")
    b = load(r["root"] / "resumed" / f"{stem}-last.pth")
    assert a["epoch"] == b["epoch"] == 3
    assert a["best_acc"] == b["best_acc"] and a["best_epoch"] == b["best_epoch"]
    assert a["net_state_dict"].keys() == b["net_state_dict"].keys()
    for k, v in a["net_state_dict"].items():  # bit-identical weights, BN statistics included
        assert torch.equal(v, b["net_state_dict"][k]), k
    for i, s in a["optimizer_state_dict"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer_state_dict"]["state"][i]["momentum_buffer"])


@pytest.mark.slow
def test_resume_of_finished_run_does_nothing(shared_runs):
    r = shared_runs
    before = digest(r["root"] / "full")
    p = run(["train_cifar10.py", *r["flags"], f"--output_dir={r['root'] / 'full'}", "--resume"])
    assert "Nothing to do" in p.stdout and "Epoch:" not in p.stdout
    assert digest(r["root"] / "full") == before  # not a byte changed, no file added (args JSON, event files)


@pytest.mark.slow
def test_eval_authors_file_infers_ranks(shared_runs, data, tmp_path):
    ckpt = load(shared_runs["root"] / "full" / f"{shared_runs['stem']}-last.pth")
    ref = tmp_path / "authors.pth"
    torch.save(authors_format(ckpt), ref)
    # --model given, ranks not: the defaults (16, 1) do not fit, so they are read off the shapes
    e = run(
        [
            "eval_cifar10.py",
            f"--pretrained={ref}",
            "--model=ResNet32_DoubleShared",
            "--batch_size=16",
            f"--dataset_path={data['c10']}",
            *COMMON,
        ]
    )
    assert "Ranks read from the checkpoint: --shared_rank=1 --unique_rank=1" in e.stdout
    assert value(e.stdout, "Eval_Acc_top1") == "%.3f" % float(ckpt["acc"])
    assert json_line(e.stdout)["model_kwargs"] == {"shared_rank": 1, "unique_rank": 1}


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-100: stages restart from the best weights with a fresh optimizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar100_train_stages_then_eval(data, tmp_path):
    out = tmp_path / "out"
    # SharedOnly takes only --shared_rank: the given --unique_rank is ignored, as in the authors' scripts
    p = run(
        [
            "train_cifar100.py",
            "--model=ResNet34_SharedOnly",
            "--shared_rank=1",
            "--unique_rank=7",
            "--epochs=3",
            "--batch_size=16",
            f"--dataset_path={data['c100']}",
            f"--output_dir={out}",
            *COMMON,
        ]
    )
    assert "\nBasis Epoch: 1" in p.stdout and "similarity loss: " in p.stdout
    assert re.search(r"^Stage 2 from epoch 2: restarting from .* with a fresh SGD at lr 0\.01$", p.stdout, re.M)
    assert re.search(r"^Stage 3 from epoch 3: restarting from .* with a fresh SGD at lr 0\.001$", p.stdout, re.M)
    last = out / "CIFAR100-ResNet34_SharedOnly-S1-U7-L10-0-last.pth"
    ckpt = load(last)
    assert ckpt["epoch"] == 3 and ckpt["stage"] == 2 and ckpt["model_kwargs"] == {"shared_rank": 1}
    e = run(["eval_cifar100.py", f"--pretrained={last}", "--batch_size=16", f"--dataset_path={data['c100']}", *COMMON])
    assert value(e.stdout, "Eval_Acc_top1") == "%.3f" % float(ckpt["acc"])


@pytest.mark.slow
@pytest.mark.parametrize("val_split", [0, 4])
def test_cifar100_restart_reloads_best_with_fresh_momentum(data, tmp_path, monkeypatch, val_split):
    """In-process, with scripted accuracies on the selection set (test, or validation with --val_split), 8 epochs
    (stages 1-4, 5-6, 7-8): the best of stage 1 is epoch 2 (neither its first nor its last), and stage 2 starts from
    epoch 2's weights; epoch 5 then becomes the best, and stage 3 starts from epoch 5's (not from epoch 6's, the
    last); each stage with empty momentum buffers and its learning rate (SPEC section 5). With --val_split the test
    set is scored once, at the end, on epoch 5's weights."""
    from utils import cli
    from utils import train as engine

    accs = {1: 40.0, 2: 50.0, 3: 45.0, 4: 42.0, 5: 55.0, 6: 52.0, 7: 30.0, 8: 30.0}
    seen = {}
    real_train = engine.train_one_epoch
    scored = []

    def fake_evaluate(net, model, loader, **kw):
        epoch = len(seen)
        scored.append((kw.get("desc"), epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        top1 = 33.0 if len(scored) > len(accs) else accs[epoch]  # after the last epoch: the final test score
        return {"top1": top1, "top5": 90.0, "loss": 1.0, "images": 16, "correct1": 0, "correct5": 0, "seconds": 0.0}

    def spy_train(net, model, loader, optimizer, **kw):
        epoch = len(seen) + 1
        entry = {k: v.clone() for k, v in model.state_dict().items()}
        info = {"entry": entry, "momentum": len(optimizer.state), "lr": optimizer.param_groups[0]["lr"]}
        result = real_train(net, model, loader, optimizer, **kw)
        info["exit"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen[epoch] = info
        return result

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    monkeypatch.setattr(engine, "train_one_epoch", spy_train)
    args = cli.parse_train_args(
        "cifar100",
        [
            "--model=ResNet18",
            "--epochs=8",
            "--batch_size=16",
            f"--dataset_path={data['c100']}",
            f"--output_dir={tmp_path}",
            f"--val_split={val_split}",
            *COMMON,
        ],
        prog="train_cifar100.py",
    )
    result = engine.fit(args)
    assert result["best_epoch"] == 5 and result["best_acc"] == 55.0
    selection = "val" if val_split else "test"
    assert [d for d, _, _ in scored] == [selection] * 8 + (["test"] if val_split else [])
    if val_split:
        assert result["val_acc"] == 55.0 and result["test_acc"] == 33.0 and result["selection"] == "val"
        best = load(result["best_checkpoint"])
        assert best["val_acc"] == 55.0 and best["test_acc"] == 33.0 and best["selection"] == "val"
        assert all(torch.equal(v, best["net_state_dict"][k]) for k, v in scored[8][2].items())  # epoch 5's weights
    else:
        assert result["test_acc"] == 55.0 and result["val_acc"] is None

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert [seen[e]["lr"] for e in range(1, 9)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    assert [e for e in range(1, 9) if seen[e]["momentum"] == 0] == [1, 5, 7]  # a fresh SGD at each stage's start
    for e in (2, 3, 4, 6, 8):  # within a stage the weights go on from the epoch before
        assert same(seen[e]["entry"], seen[e - 1]["exit"]), e
    assert same(seen[5]["entry"], seen[2]["exit"])  # stage 2 starts from the best of stage 1, epoch 2
    assert not same(seen[5]["entry"], seen[4]["exit"]) and not same(seen[2]["exit"], seen[1]["exit"])
    assert same(seen[7]["entry"], seen[5]["exit"])  # stage 3 from the best so far, epoch 5, not the last (epoch 6)
    assert not same(seen[7]["entry"], seen[6]["exit"]) and not same(seen[5]["exit"], seen[2]["exit"])
    best = load(result["best_checkpoint"])
    assert best["epoch"] == 5 and same(best["net_state_dict"], seen[5]["exit"])


# ---------------------------------------------------------------------------------------------------------------------
# ILSVRC: a plain model trains (the authors' script crashed) and evaluates from a DataParallel-style file
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ilsvrc_train_then_eval(data, tmp_path):
    out = tmp_path / "out"
    # the README's ILSVRC MobileNetV2 command, shrunk (MobileNetV2_Shared takes no rank flags: they are ignored)
    p = run(
        [
            "train_ilsvrc.py",
            "--model=MobileNetV2_Shared",
            "--lr=0.1",
            "--momentum=0.9",
            "--weight_decay=1e-4",
            "--lambdaR=10",
            "--epochs=1",
            "--batch_size=8",
            f"--dataset_path={data['in']}",
            f"--output_dir={out}",
            *COMMON,
        ]
    )
    top1, top5 = re.findall(r"^Test_Acc_Top1/5 = (\S+)\t(\S+)$", p.stdout, re.M)[-1]
    assert "\nBasis Epoch: 1" in p.stdout and "similarity loss: " in p.stdout
    assert "test images | 3 classes (the data's folders) |" in p.stdout  # the head is as wide as the tree
    # MobileNetV2 schedule (150/225/285 of 300) in 1 epoch: no milestone, the header says which stages went
    assert "1 epochs, lr 0.1 (3 last stages of the recipe dropped: no epoch left)" in p.stdout
    last = out / "ILSVRC-MobileNetV2_Shared-S32-U1-L10-0-last.pth"
    ckpt = load(last)
    assert ckpt["model_kwargs"] == {} and ckpt["dataset"] == "ilsvrc"
    ref = tmp_path / "authors.pth"
    torch.save(authors_format(ckpt, "module."), ref)  # the authors' ILSVRC files are DataParallel state_dicts
    e = run(
        [
            "eval_ilsvrc.py",
            f"--pretrained={ref}",
            "--model=MobileNetV2_Shared",
            "--batch_size=8",
            f"--dataset_path={data['in']}",
            *COMMON,
        ]
    )
    assert value(e.stdout, "Eval_Acc_top1") == top1 and value(e.stdout, "Eval_Acc_top5") == top5
    assert "Compare: paper row MobileNetV2-Shared: 3.24M params, 0.66G FLOPs (2 x MACs), top-1 err 27.61%" in e.stdout
    assert json_line(e.stdout)["paper_top1_err"] == "27.61%"
    assert load(last)["net_state_dict"]["classifier.1.bias"].shape == (3,)
    # a 1000-class file (the published ones) on this 3-class tree: one line, in eval and as --pretrained
    wide = tmp_path / "wide.pth"
    torch.save({"net_state_dict": get_model("MobileNetV2_Shared", "ilsvrc").state_dict()}, wide)
    for argv in (
        ["eval_ilsvrc.py", f"--pretrained={wide}"],
        ["train_ilsvrc.py", f"--pretrained={wide}", "--epochs=1", f"--output_dir={tmp_path / 'o'}"],
    ):
        bad = run(
            [*argv, "--model=MobileNetV2_Shared", "--batch_size=8", f"--dataset_path={data['in']}", *COMMON], rc=1
        )
        assert "has 1000 outputs but the dataset under" in bad.stderr and "has 3 classes" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero status, no traceback, existing files untouched
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_inputs(shared_runs, data, tmp_path):
    r = shared_runs
    full = r["root"] / "full"
    best = full / f"{r['stem']}.pth"
    last = full / f"{r['stem']}-last.pth"
    ref = tmp_path / "authors.pth"
    torch.save(authors_format(load(last)), ref)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    # an output dir whose last checkpoint was cut short (e.g. copied from a full disk by another tool)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(truncated, broken / f"{r['stem']}-last.pth")
    partial = tmp_path / "partial"  # CIFAR-10 with a training batch missing (no download is attempted)
    shutil.copytree(data["c10"], partial)
    (partial / "cifar-10-batches-py" / "data_batch_3").unlink()

    train = ["train_cifar10.py", *r["flags"], f"--output_dir={full}"]  # same run: would overwrite full/ on success
    ev = ["eval_cifar10.py", "--batch_size=16", f"--dataset_path={data['c10']}", *COMMON]
    cases = {
        "unknown model (train)": (
            [*train, "--model=ResNet99"],
            2,
            ["unknown --model 'ResNet99'", "ResNet56_DoubleShared"],
        ),
        "unknown model (eval)": (
            ["eval_cifar100.py", f"--pretrained={best}", "--model=ResNet56"],
            2,
            ["valid names", "ResNet34_SingleShared"],
        ),
        "eval without --pretrained": ([*ev], 2, ["--pretrained"]),
        "wrong ranks (ours)": (
            [*ev, f"--pretrained={best}", "--shared_rank=2"],
            1,
            ["pass --shared_rank=1 --unique_rank=1"],
        ),
        "wrong ranks (authors')": (
            [*ev, f"--pretrained={ref}", *SHARED[:1], "--shared_rank=4", "--unique_rank=1"],
            1,
            ["pass --shared_rank=1 --unique_rank=1"],
        ),
        "other model": ([*ev, f"--pretrained={best}", "--model=ResNet20"], 1, ["--model=ResNet32_DoubleShared"]),
        "other dataset": (["eval_cifar100.py", f"--pretrained={best}", *COMMON], 1, ["trained on cifar10"]),
        "missing dataset (cifar)": ([*train, f"--dataset_path={partial}"], 1, ["data_batch_3", "not found"]),
        "missing dataset (ilsvrc)": (
            [
                "train_ilsvrc.py",
                "--model=ResNet18",
                f"--dataset_path={tmp_path / 'none'}",
                f"--output_dir={full}",
                *COMMON,
            ],
            1,
            ["not found"],
        ),
        "garbage checkpoint (eval)": ([*ev, f"--pretrained={garbage}"], 1, ["not a readable PyTorch checkpoint"]),
        "truncated checkpoint (pretrained)": ([*train, f"--pretrained={truncated}"], 1, ["not a readable"]),
        "truncated checkpoint (resume)": ([*r["flags"], f"--output_dir={broken}", "--resume"], 1, ["not a readable"]),
        "nothing to resume": (
            [*r["flags"], f"--output_dir={tmp_path / 'empty'}", "--resume"],
            1,
            ["nothing to resume"],
        ),
    }
    cases["truncated checkpoint (resume)"][0].insert(0, "train_cifar10.py")
    cases["nothing to resume"][0].insert(0, "train_cifar10.py")
    before = {d: digest(d) for d in (full, broken)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(cases, pool.map(lambda c: run(c[0], rc=None), cases.values())))
    failures = []
    for name, (_, rc, needles) in cases.items():
        p = results[name]
        err = p.stderr.strip()
        problems = []
        if p.returncode != rc:
            problems.append(f"exit {p.returncode}, expected {rc}")
        if "Traceback" in err or len(err.splitlines()) != 1:
            problems.append("stderr is not one line")
        problems += [f"no {n!r} in stderr" for n in needles if n not in err]
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    stderr: {err[-1500:]}")
    assert not failures, "\n".join(failures)
    assert {d: digest(d) for d in (full, broken)} == before  # nothing written, replaced or deleted
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr=-1"], "--lr"),
        (["--lr=nan"], "--lr"),
        (["--momentum=-0.5"], "--momentum"),
        (["--weight_decay=-1"], "--weight_decay"),
        (["--lambdaR=-10"], "--lambdaR"),
        (["--batch_size=0"], "--batch_size"),
        (["--shared_rank=0"], "--shared_rank"),
        (["--unique_rank=-1"], "--unique_rank"),
        (["--epochs=0"], "--epochs"),
        (["--num_workers=-1"], "--num_workers"),
        (["--device=gpu"], "--device"),
        (["--model=resnet57"], "valid names"),  # a case-only variant (resnet56) is accepted
        (["--epochs=5", "--starting_epoch=5"], "--starting_epoch"),
        (["--resume", "--pretrained=x.pth"], "exclusive"),
    ],
)
def test_cli_validation(argv, needle, capsys):
    """Flag errors: argparse's exit status 2 and one line naming the flag (in-process: no data, no model)."""
    from utils import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args("cifar10", argv, prog="train_cifar10.py")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_cli_defaults(monkeypatch):
    """The authors' defaults per script; plain models get their family's ILSVRC schedule; lambdaR is a float."""
    from utils import cli

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    a = cli.parse_train_args("ilsvrc", [], prog="train_ilsvrc.py")
    assert (a.lr, a.momentum, a.weight_decay, a.lambdaR, a.shared_rank, a.unique_rank, a.batch_size) == (
        0.1,
        0.9,
        1e-4,
        10.0,
        32,
        1,
        256,
    )
    assert (a.model, a.dataset_path, a.visible_device, a.pretrained, a.starting_epoch, a.output_dir) == (
        "ResNet34_DoubleShared",
        "/media/data/ILSVRC2012/",
        "0",
        None,
        0,
        "./checkpoint",
    )
    assert a.epochs == 150 and a.schedule["milestones"] == [60, 100, 140]
    # the authors' script had no schedule for the plain ILSVRC models (NameError); they take their family's
    assert cli.parse_train_args("ilsvrc", ["--model=ResNet18"]).schedule["milestones"] == [60, 100, 140]
    plain = cli.parse_train_args("ilsvrc", ["--model=MobileNetV2"])
    assert plain.epochs == 300 and plain.schedule["milestones"] == [150, 225, 285]
    b = cli.parse_train_args("cifar100", ["--lambdaR=10", "--epochs=30"])
    assert b.epochs == 30 and b.schedule == {
        "milestones": [150, 225],
        "gammas": [0.1, 0.1],
        "restart": True,
        "recipe_epochs": 300,
        "include_unique": False,  # SPEC section 4: CIFAR-100's R is over the shared bases only
    }
    assert b.lambdaR == 10.0 and b.model == "ResNet34_SingleShared" and b.weight_decay == 5e-4
    assert cli.parse_train_args("cifar10", []).schedule["include_unique"] is True  # SPEC section 4
    e = cli.parse_eval_args("cifar10", ["--pretrained=x.pth"])
    assert e.model is None and e.shared_rank is None  # ranks are read off the checkpoint's tensors
    assert e.fallback == {"model": "ResNet56_DoubleShared"}


def test_rank_defaults_have_one_owner(monkeypatch, capsys):
    """Issue 24: rank flags not given take the model's paper row. SPEC section 9: ResNeXt50-"S16U1" is built with
    64/4 (the scripts' 16/1 cannot build it); the authors' commands, which give ranks, keep their ranks; models that
    take no rank keep the authors' file names (SPEC section 7: plain models still get -S16-U1, ILSVRC -S32-U1)."""
    from models import get_model
    from utils import cli
    from utils.run_start import model_for_run, run_stem

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", "0")
    a = cli.parse_train_args("cifar100", ["--model=ResNext50_SingleShared"], prog="train_cifar100.py")
    assert (a.shared_rank, a.unique_rank) == (64, 4) and a.default_ranks == {"shared_rank": 64, "unique_rank": 4}
    assert model_for_run(a).cfg.build_kwargs() == get_model("ResNext50_SingleShared", "cifar100").cfg.build_kwargs()
    given = cli.parse_train_args("cifar10", ["--shared_rank=8", "--unique_rank=1"], prog="train_cifar10.py")
    assert (given.shared_rank, given.unique_rank, given.default_ranks) == (8, 1, {})
    only = cli.parse_train_args("cifar10", ["--model=ResNet56_SharedOnly"], prog="train_cifar10.py")
    assert only.default_ranks == {"shared_rank": 16} and run_stem(only) == "CIFAR10-ResNet56_SharedOnly-S16-U1-L10-0"
    plain = cli.parse_train_args("ilsvrc", ["--model=MobileNetV2_Shared"], prog="train_ilsvrc.py")
    assert plain.default_ranks == {} and run_stem(plain) == "ILSVRC-MobileNetV2_Shared-S32-U1-L10-0"
    with pytest.raises(SystemExit):
        cli.parse_train_args("cifar100", ["--help"], prog="train_cifar100.py")
    assert "paper row" in " ".join(capsys.readouterr().out.split())


def test_schedules():
    from utils.train import Schedule

    c10 = Schedule.from_recipe(0.1, {"recipe_epochs": 300, "milestones": [150, 225]})
    assert [c10.lr_at(e) for e in (1, 150, 151, 225, 226, 300)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    short = Schedule.from_recipe(0.1, {"recipe_epochs": 300, "milestones": [150, 225]}, epochs=30)
    assert short.milestones == (15, 22)
    ilsvrc = Schedule.from_recipe(0.1, {"recipe_epochs": 150, "milestones": [60, 100, 140]})
    assert [ilsvrc.stage(e) for e in (60, 61, 100, 101, 140, 141, 150)] == [0, 1, 1, 2, 2, 3, 3]
    assert Schedule.from_recipe(0.1, {"recipe_epochs": 150, "milestones": [60, 100, 140]}, epochs=1).lr_at(1) == 0.1


def test_a_schedule_is_an_edit_of_its_script(monkeypatch):
    """Issue 24: the recipe is train_cifar10.py's data; a changed entry there is the whole change."""
    import train_cifar10
    from utils import cli
    from utils.train import Schedule

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", "0")
    recipe = dict(train_cifar10.RECIPE, epochs=200, milestones=[100], gammas=[0.5], weight_decay=1e-4)
    a = cli.parse_train_args("cifar10", [], prog="train_cifar10.py", recipe=recipe)
    s = Schedule.from_recipe(a.lr, a.schedule, a.epochs)
    assert (s.epochs, s.milestones, a.weight_decay) == (200, (100,), 1e-4)
    assert [s.lr_at(e) for e in (100, 101)] == pytest.approx([0.1, 0.05])


@pytest.mark.parametrize(
    "total,milestones,epochs,lrs,dropped",
    [
        (300, [150, 225], 1, [0.1], 2),  # one epoch: no step (not "x0.1 after epochs [1, 1]")
        (300, [150, 225], 2, [0.1, 0.01], 1),  # stage 1 then stage 2, never straight to stage 3
        (300, [150, 225], 3, [0.1, 0.01, 0.001], 0),
        (150, [60, 100, 140], 3, [0.1, 0.01, 0.001], 1),  # a stage collapsed to nothing ends the schedule there
        (150, [60, 100, 140], 4, [0.1, 0.01, 0.001, 1e-4], 0),
    ],
)
def test_short_runs_keep_stages_in_order(total, milestones, epochs, lrs, dropped):
    """Issue 27 item 6: scaled milestones are strictly increasing and inside the run; a stage with no epoch is
    dropped (the LRs are the recipe's stages in order: lr, x0.1, x0.01, ... of SPEC section 5)."""
    from utils.train import Schedule

    s = Schedule.from_recipe(0.1, {"recipe_epochs": total, "milestones": milestones}, epochs=epochs)
    assert [s.lr_at(e) for e in range(1, epochs + 1)] == pytest.approx(lrs)
    assert all(a < b < epochs for a, b in zip((0, *s.milestones), s.milestones))
    assert s.dropped == dropped and ("dropped" in s.describe()) == bool(dropped)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation folds for inference by default
# ---------------------------------------------------------------------------------------------------------------------


def _eval_in_process(argv, capsys, monkeypatch, defaults=None):
    from utils import cli

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    code = cli.eval_main(defaults or "cifar10", [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.slow
def test_eval_folds_by_default_with_the_same_accuracy(shared_runs, data, capsys, monkeypatch):
    best = shared_runs["root"] / "full" / f"{shared_runs['stem']}.pth"
    flags = [f"--pretrained={best}", "--batch_size=16", f"--dataset_path={data['c10']}", *COMMON]
    folded = _eval_in_process(flags, capsys, monkeypatch)
    plain = _eval_in_process([*flags, "--no_fold"], capsys, monkeypatch)
    nhwc = _eval_in_process([*flags, "--channels_last"], capsys, monkeypatch)
    assert "| folded for inference" in folded and "| unfolded" in plain
    assert json_line(folded)["folded"] is True and json_line(plain)["folded"] is False
    for label in ("Eval_Acc_top1", "Eval_Acc_top5"):
        assert value(folded, label) == value(plain, label) == value(nhwc, label)
        assert value(folded, label) == value(shared_runs["full"].stdout, label.replace("Eval", "Best"))
    assert abs(json_line(folded)["loss"] - json_line(plain)["loss"]) < 1e-4
    assert json_line(folded)["params"] == json_line(plain)["params"]  # the trained (factorised) model's count
    amp = _eval_in_process([*flags, "--amp"], capsys, monkeypatch)
    assert "bf16 autocast" in amp and json_line(amp)["folded"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet20", "ResNet32_DoubleShared"])
def test_eval_and_export_agree_on_what_folds(name, data, tmp_path, capsys, monkeypatch):
    """Issue 24 bug 4: a model without foldable blocks (a plain ResNet) is not reported "folded for inference" by
    eval while models.export says "no foldable blocks" for it; a shared ResNet is folded by both."""
    from models.export import export_model
    from utils.checkpoint import make_checkpoint, save_checkpoint

    model = get_model(name, "cifar10", **({"shared_rank": 1, "unique_rank": 1} if "Shared" in name else {}))
    path = tmp_path / "m.pth"
    save_checkpoint(make_checkpoint(model, None, epoch=1, acc=0.0), str(path))
    out = _eval_in_process(
        [f"--pretrained={path}", f"--dataset_path={data['c10']}", "--batch_size=32", *COMMON], capsys, monkeypatch
    )
    report = export_model(model.eval(), tmp_path / "m.pt2", example_input=torch.randn(2, 3, 32, 32), num_batches=1)
    shared = "Shared" in name
    assert json_line(out)["folded"] is report["folded"] is shared
    assert ("| folded for inference" in out) is shared and ("no foldable blocks" in report["note"]) is not shared


def test_eval_of_a_plain_model_does_not_claim_folding(data, tmp_path, capsys, monkeypatch):
    """Issue 24 bug 4, fast: a plain ResNet20 has no factorised conv to fold (README, deliberate difference 13)."""
    from utils.checkpoint import make_checkpoint, save_checkpoint

    path = tmp_path / "m.pth"
    save_checkpoint(make_checkpoint(get_model("ResNet20", "cifar10"), None, epoch=1, acc=0.0), str(path))
    flags = [f"--pretrained={path}", f"--dataset_path={data['c10']}", "--batch_size=32", *COMMON]
    out = _eval_in_process(flags, capsys, monkeypatch)
    assert json_line(out)["folded"] is False and "folded for inference" not in out and "no foldable blocks" in out


def test_eval_help_and_fold_name_say_what_is_true(capsys):
    """Issue 24 bug 5: eval reads ranks off the tensor shapes (no 16/1 fallback), and ``models.fold`` is one thing."""
    import importlib.util

    import models
    from utils import cli

    with pytest.raises(SystemExit):
        cli.parse_eval_args("cifar10", ["--help"], prog="eval_cifar10.py")
    text = " ".join(capsys.readouterr().out.split())
    assert "else 16" not in text and "else 1)" not in text and "tensor shapes" in text
    assert callable(models.fold) and importlib.util.find_spec("models.fold") is None


# ---------------------------------------------------------------------------------------------------------------------
# --val_split: honest model selection
# ---------------------------------------------------------------------------------------------------------------------


def test_val_split_indices_and_loaders(data, tmp_path):
    from utils import data as D

    train_idx, val_idx = D.val_split_indices(32, 6)
    assert len(val_idx) == 6 and len(train_idx) == 26 and not set(val_idx.tolist()) & set(train_idx.tolist())
    assert torch.equal(D.val_split_indices(32, 6)[1], val_idx)  # fixed: independent of --seed and of torch's RNG
    assert not torch.equal(D.val_split_indices(32, 6, seed=1)[1], val_idx)
    images, labels = D.load_cifar(data["c10"], "cifar10", True)
    for gpu in (False, True):
        out = D.build_loaders("cifar10", data["c10"], 4, num_workers=0, val_split=6, gpu_pipeline=gpu, seed=3)
        assert len(out.train.dataset) == 26 and len(out.val.dataset) == 6 and len(out.test.dataset) == 32
        ref = D.build_loaders("cifar10", data["c10"], 4, num_workers=0, gpu_pipeline=gpu).test
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in D.MEAN_STD["cifar10"])
        expect = (images[val_idx].permute(0, 3, 1, 2).float() / 255 - mean) / std
        first = torch.cat([x for x, _ in out.val])
        assert torch.allclose(first, expect, atol=1e-6)  # the held-out images, test transform (no augmentation)
        assert torch.equal(torch.cat([y for _, y in out.val]), labels[val_idx])
        assert torch.equal(torch.cat([x for x, _ in out.val]), first)  # same every pass
        train_labels = torch.cat([y for _, y in out.train])
        assert sorted(train_labels.tolist()) == sorted(labels[train_idx].tolist())
        assert len(ref.dataset) == 32
    imagenet = D.build_loaders("ilsvrc", data["in"], 2, num_workers=0, val_split=2)
    assert len(imagenet.train.dataset) == 4 and len(imagenet.val.dataset) == 2
    a = torch.cat([x for x, _ in imagenet.val])
    assert a.shape == (2, 3, 224, 224) and torch.equal(a, torch.cat([x for x, _ in imagenet.val]))  # val transforms
    assert set(imagenet.val.dataset.indices).isdisjoint(imagenet.train.dataset.dataset.indices)


@pytest.mark.slow
def test_val_split_run_resume_and_final_test_score(data, tmp_path, capsys, monkeypatch):
    """Best checkpoint chosen on 6 held-out training images; the test set scored once at the end on it (and that
    number is what the eval script gives for the file); the split is the recorded one on --resume, even if the
    default seed changed meanwhile; an interrupted + resumed run ends bit-identical to an uninterrupted one."""
    from utils import cli
    from utils import data as D
    from utils.train import TrainingRun

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    flags = [
        *SHARED,
        "--epochs=3",
        "--batch_size=16",
        "--val_split=6",
        "--seed=4",
        f"--dataset_path={data['c10']}",
        *COMMON,
    ]
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0"

    def train(out, *extra):
        code = cli.train_main("cifar10", [*flags, f"--output_dir={out}", *extra])
        o, e = capsys.readouterr()
        return code, o, e

    code, full, _ = train(tmp_path / "full")
    assert code == 0
    assert "26 train / 6 val (held out" in full and "best checkpoint chosen on val" in full
    assert "Best_Acc_top1" not in full and "| val loss " in full and "| test loss" not in full
    result = json_line(full)
    best = load(result["best_checkpoint"])
    assert best["selection"] == "val" and best["val_split"] == {"n": 6, "seed": D.VAL_SPLIT_SEED}
    assert best["epoch"] == result["best_epoch"] and float(best["val_acc"]) == result["val_acc"] == result["best_acc"]
    assert "%.3f" % best["test_acc"] == value(full, "Test_Acc_top1") and best["test_acc"] == result["test_acc"]
    assert "%.3f" % best["val_acc"] == value(full, "Best_Val_Acc_top1")
    assert load(tmp_path / "full" / f"{stem}-last.pth").get("test_acc") is None or result["best_epoch"] == 3
    # the eval script on the chosen checkpoint prints the training's final test numbers
    ev = _eval_in_process(
        [f"--pretrained={result['best_checkpoint']}", "--batch_size=16", f"--dataset_path={data['c10']}", *COMMON],
        capsys,
        monkeypatch,
    )
    assert value(ev, "Eval_Acc_top1") == value(full, "Test_Acc_top1")
    assert value(ev, "Eval_Acc_top5") == value(full, "Test_Acc_top5")

    # interrupted after epoch 2, resumed after the default split seed changed: the recorded split is used
    real = TrainingRun.save

    def stop(self, ckpt, paths, epoch=None):
        real(self, ckpt, paths, epoch)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "save", stop)
    code, _, err = train(tmp_path / "resumed")
    assert code == 130 and "epoch 2 (the last completed)" in err
    monkeypatch.setattr(TrainingRun, "save", real)
    monkeypatch.setattr(D, "VAL_SPLIT_SEED", 12345)
    code, _, err = train(tmp_path / "resumed", "--resume", "--val_split=7")
    assert code == 1 and "--val_split=6" in err
    code, resumed, _ = train(tmp_path / "resumed", "--resume")
    assert code == 0 and "26 train / 6 val (held out, split seed 20240229)" in resumed
    assert value(resumed, "Test_Acc_top1") == value(full, "Test_Acc_top1")
    a, b = load(tmp_path / "full" / f"{stem}-last.pth"), load(tmp_path / "resumed" / f"{stem}-last.pth")
    assert all(torch.equal(v, b["net_state_dict"][k]) for k, v in a["net_state_dict"].items())
    # a finished run resumed again: prints the stored scores, rewrites nothing
    before = digest(tmp_path / "resumed")
    code, again, _ = train(tmp_path / "resumed", "--resume")
    assert code == 0 and "Nothing to do" in again and value(again, "Test_Acc_top1") == value(full, "Test_Acc_top1")
    assert {k: v for k, v in digest(tmp_path / "resumed").items() if k.endswith(".pth")} == {
        k: v for k, v in before.items() if k.endswith(".pth")
    }


def test_authors_hyphen_model_spelling_and_closest_name(capsys):
    from utils import cli

    args = cli.parse_train_args("cifar10", ["--model=ResNet56-DoubleShared"], prog="train_cifar10.py")
    assert args.model == "ResNet56_DoubleShared"
    with pytest.raises(SystemExit) as e:
        cli.parse_eval_args("cifar10", ["--pretrained=x.pth", "--model=ResNet56_DubleShared"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert "unknown --model 'ResNet56_DubleShared' for cifar10 (did you mean ResNet56_DoubleShared?); valid" in err


@pytest.mark.slow  # about 3 s: the ILSVRC models' layouts are built to find what the file fits
def test_errors_speak_python_in_python_and_flags_in_the_scripts(tmp_path, capsys, monkeypatch):
    """Issue 27: load_model names keyword arguments, the scripts their flags; the ILSVRC eval of a CIFAR-10 file
    names the dataset and model the file fits (in process: the file is refused before any data is read)."""
    from models.pretrained import CheckpointError, load_model
    from utils import cli

    torch.manual_seed(0)
    authors = tmp_path / "authors.pth"  # the authors' format: weights only, no record of model or dataset
    torch.save(
        {"net_state_dict": get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1).state_dict()},
        authors,
    )
    with pytest.raises(CheckpointError) as e:
        load_model(authors, dataset="cifar10")
    assert 'the file fits model="ResNet32_DoubleShared", shared_rank=2, unique_rank=1' in str(e.value)
    assert "--" not in str(e.value)
    with pytest.raises(CheckpointError, match='fits dataset="cifar10", model="ResNet32_DoubleShared"'):
        load_model(authors)
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    flags = [f"--pretrained={authors}", f"--dataset_path={tmp_path / 'none'}", *COMMON]
    assert cli.eval_main("cifar10", [*flags, "--model=ResNet32_DoubleShared", "--shared_rank=4"]) == 1
    assert "pass --shared_rank=2 --unique_rank=1\n" in capsys.readouterr().err
    assert cli.eval_main("ilsvrc", flags) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "fits --model=ResNet32_DoubleShared --shared_rank=2 --unique_rank=1 with the cifar10 scripts" in err


def test_a_flag_without_its_dashes_and_a_model_name_in_other_case(capsys):
    """Issue 27: ``lambdaR=10`` (the authors' README drops a ``--`` too) says which flag was meant; a --model name
    that differs from a registered one only in case is that model; an ambiguous or unknown word is still refused."""
    from models import get_model
    from utils import cli

    for argv, hint in ((["lambdaR=10"], "--lambdaR=10"), (["--lambdar=10"], "--lambdaR=10"), (["-seed=3"], "--seed=3")):
        with pytest.raises(SystemExit) as e:
            cli.parse_train_args("cifar10", argv, prog="train_cifar10.py")
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"unrecognized arguments: {argv[0]} (did you mean {hint}?)" in err
    with pytest.raises(SystemExit):
        cli.parse_train_args("cifar10", ["results.txt"], prog="train_cifar10.py")
    assert "did you mean" not in capsys.readouterr().err
    args = cli.parse_train_args("cifar10", ["--model=Resnet56_doubleshared"], prog="train_cifar10.py")
    assert args.model == "ResNet56_DoubleShared"
    assert cli.parse_eval_args("cifar100", ["--pretrained=x.pth", "--model=resnext50"]).model == "ResNext50"
    assert get_model("resnet20", "cifar10").cfg.name == "ResNet20"
