"""What users of a run rely on, checked in-process on tiny data: the file names they grep (SPEC section 7), the GPU
choice and the ``Cuda N`` line (SPEC section 6), DataParallel over several visible GPUs (README, deliberate difference
8), the strict ">" rule for a new best (SPEC section 5), the top-5 numbers of an evaluation, and ``--resume`` across a
CIFAR-100 stage boundary."""

import contextlib
import io
import json
import os
import signal
import sys

import pytest
import torch
import torch.nn as nn

try:
    from tests.fakedata import write_fake_cifar, write_fake_imagefolder
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar, write_fake_imagefolder

from models import get_model
from models.pretrained import read_checkpoint
from utils import cli
from utils import engine as E
from utils import train as T
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.run_start import run_stem

COMMON = ["--device=cpu", "--num_workers=0", "--seed=3"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, one_thread):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    monkeypatch.setenv("CI", "1")  # no progress bars


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_fake_cifar(root, "cifar10", n_train=8, n_test=10, seed=0)  # 10 test images: each class once
    return str(root)


def _train_printing(dataset: str, argv: list) -> tuple:
    """``cli.train_main`` with what it prints (module-scoped fixtures cannot use capsys)."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = cli.train_main(dataset, argv)
    return code, printed.getvalue()


def _scripted_evaluate(scores: dict, epoch: list):
    """A stand-in for the test pass that scores epoch ``epoch[0]`` as ``scores`` says (top-5 = top-1 + 10)."""

    def evaluate(net, model, loader, **kw):
        top1 = scores[epoch[0]]
        return {"top1": top1, "top5": top1 + 10, "loss": 1.0, "images": 8, "correct1": 0, "correct5": 0, "seconds": 0}

    return evaluate


def _no_training(net, model, loader, optimizer, **kw):
    return dict(E.pass_stats([1.0, 0.0, 1, 2, 2], 0.01, False), steps=len(loader), stopped=False)


def _count_epochs(mp: pytest.MonkeyPatch, epoch: list) -> None:
    real = T.TrainingRun.begin_epoch

    def begin_epoch(self, e):
        epoch[0] = e
        return real(self, e)

    mp.setattr(T.TrainingRun, "begin_epoch", begin_epoch)


# ---------------------------------------------------------------------------------------------------------------------
# --visible_device and the checkpoint names (SPEC section 7)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train", "eval"])
def test_visible_device_sets_cuda_visible_devices(script, monkeypatch):
    """SPEC section 6: ``--visible_device`` is CUDA_VISIBLE_DEVICES; without it the environment's choice stands."""

    def parse(dataset, argv):
        if script == "train":
            return cli.parse_train_args(dataset, argv)
        return cli.parse_eval_args(dataset, [*argv, "--pretrained=any.pth"])

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert parse("ilsvrc", ["--visible_device=0,1,2,3"]).visible_device == "0,1,2,3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse("cifar10", ["--visible_device=1"]).visible_device == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the flag wins over the environment
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse("cifar10", []).visible_device == "2,3" and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert parse("cifar10", []).visible_device == "0"  # the authors' default


@pytest.mark.parametrize(
    "flags, name",
    [
        # SPEC section 7's own examples (with L10, not L10.0: README, deliberate difference 5)
        (
            ["--model=ResNet56_DoubleShared", "--lambdaR=10", "--shared_rank=16", "--unique_rank=1"],
            "CIFAR10-ResNet56_DoubleShared-S16-U1-L10-0",
        ),
        (["--model=ResNet56_DoubleShared", "--shared_rank=16"], "CIFAR10-ResNet56_DoubleShared-S16-U1-L10-0"),
        (["--model=ResNet20"], "CIFAR10-ResNet20-S16-U1-L10-0"),  # plain models still get -S16-U1
        # a non-integer lambdaR is written as Python writes the float (the authors' f-string of args.lambdaR)
        (["--model=ResNet20", "--lambdaR=0.5"], "CIFAR10-ResNet20-S16-U1-L0.5-0"),
        (["--model=ResNet20", "--lambdaR=2.5e-5"], "CIFAR10-ResNet20-S16-U1-L2.5e-05-0"),
        (["--model=ResNet20", "--lambdaR=0.1234567"], "CIFAR10-ResNet20-S16-U1-L0.1234567-0"),
        (["--model=ResNet20", "--lambdaR=0"], "CIFAR10-ResNet20-S16-U1-L0-0"),
        (["--model=ResNet20", "--visible_device=0,1,2,3"], "CIFAR10-ResNet20-S16-U1-L10-0,1,2,3"),
    ],
)
def test_checkpoint_names_are_the_authors(flags, name, monkeypatch):
    assert run_stem(cli.parse_train_args("cifar10", flags)) == name


def test_ilsvrc_names_and_the_readme_command(monkeypatch):
    """SPEC section 7: ``ILSVRC-ResNet34_DoubleShared-S32-U1-L10.0-0,1,2,3.pth`` from the README command (L10 here)."""
    argv = "--lr=0.1 --momentum=0.9 --weight_decay=1e-4 --lambdaR=10 --shared_rank=32 --unique_rank=1 --batch_size=512"
    argv = argv.split() + ["--model=ResNet34_DoubleShared", "--visible_device=0,1,2,3"]
    assert run_stem(cli.parse_train_args("ilsvrc", argv)) == "ILSVRC-ResNet34_DoubleShared-S32-U1-L10-0,1,2,3"
    assert (
        run_stem(cli.parse_train_args("cifar100", ["--lambdaR=1.5", "--visible_device=0"]))
        == "CIFAR100-ResNet34_SingleShared-S16-U1-L1.5-0"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Four visible GPUs, faked on the CPU: DataParallel, the "Cuda N" lines, checkpoints without "module."
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_gpu_run(c10, tmp_path_factory):
    """A 1-epoch CIFAR-10 run with ``--visible_device=0,1,2,3`` where torch reports 4 CUDA devices: the run computes
    on the CPU, but wrapping and printing see a CUDA device (DataParallel without a GPU calls its module); the test
    pass is scripted."""
    out = tmp_path_factory.mktemp("gpus")
    nets = []
    real_wrap = T.wrap_model

    def wrap_as_on_gpu(model, device, precision, **kw):
        nets.append(real_wrap(model, torch.device("cuda", 0), precision, **kw))
        return nets[-1]

    real_epoch = T.TrainingRun.begin_epoch

    def epoch_as_on_gpu(self, epoch):  # the epoch's start prints the authors' "Cuda <visible_device>" line
        cpu, self.device = self.device, torch.device("cuda", 0)
        try:
            return real_epoch(self, epoch)
        finally:
            self.device = cpu

    argv = [
        "--model=ResNet32_DoubleShared",
        "--shared_rank=1",
        "--unique_rank=1",
        "--epochs=1",
        "--batch_size=8",
        "--visible_device=0,1,2,3",
        f"--dataset_path={c10}",
        f"--output_dir={out}",
        *COMMON,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "0")
        mp.setenv("CI", "1")
        mp.setattr(torch.cuda, "device_count", lambda: 4)
        mp.setattr(sys.modules["torch.nn.parallel.data_parallel"], "_get_available_device_type", lambda: None)
        mp.setattr(T, "wrap_model", wrap_as_on_gpu)
        mp.setattr(T.TrainingRun, "begin_epoch", epoch_as_on_gpu)
        mp.setattr(T, "evaluate", _scripted_evaluate({1: 50.0}, [1]))
        code, printed = _train_printing("cifar10", argv)
    assert code == 0, printed[-2000:]
    return {"out": out, "stdout": printed, "nets": nets}


def test_several_visible_gpus_train_in_dataparallel(four_gpu_run):
    """README: ``--visible_device=0,1,2,3`` wraps the model in DataParallel when more than one GPU is visible."""
    (net,) = four_gpu_run["nets"]
    assert isinstance(net, nn.DataParallel) and net.module.cfg.name == "ResNet32_DoubleShared"
    assert "Let's use 4 GPUs!" in four_gpu_run["stdout"].splitlines()  # SPEC section 6, the authors' line


def test_one_visible_gpu_is_not_wrapped(monkeypatch):
    model = get_model("ResNet20", "cifar10")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert E.wrap_model(model, torch.device("cuda", 0), E.Precision()) is model
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert E.wrap_model(model, torch.device("cpu"), E.Precision()) is model  # a CPU run never is


def test_checkpoints_of_a_dataparallel_run_carry_no_module_prefix(four_gpu_run):
    """README: saved checkpoints never carry ``module.``; the keys are the model's own."""
    keys = list(get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1).state_dict())
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0,1,2,3"
    for name in (f"{stem}.pth", f"{stem}-last.pth"):
        ckpt = torch.load(four_gpu_run["out"] / name, map_location="cpu", weights_only=True)
        assert list(ckpt["net_state_dict"]) == keys, name


def test_gpu_epoch_lines_carry_the_cuda_prefix(four_gpu_run):
    """SPEC section 6: blank line, then ``Cuda <visible_device> Basis Epoch: <e>`` for a regularised model."""
    out = four_gpu_run["stdout"]
    assert "\n\nCuda 0,1,2,3 Basis Epoch: 1\n" in out, out


def test_the_run_files_are_named_with_the_visible_devices(four_gpu_run):
    stem = "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0,1,2,3"
    files = {f for f in os.listdir(four_gpu_run["out"]) if not f.startswith(".")}
    assert files == {f"{stem}.pth", f"{stem}-last.pth", f"{stem}-args.json", "runs"}


# ---------------------------------------------------------------------------------------------------------------------
# ILSVRC history files and the strict ">" rule, with scripted test scores
# ---------------------------------------------------------------------------------------------------------------------

ILSVRC_SCORES = {1: 30.0, 2: 30.0, 3: 40.0, 4: 40.0, 5: 35.0, 6: 20.0}


@pytest.fixture(scope="module")
def ilsvrc_run(tmp_path_factory):
    """6 epochs of a plain MobileNetV2 on a 2-class ImageFolder tree, without computing: the training pass returns
    fixed counts and the test pass scores ILSVRC_SCORES; what runs for real is the epoch loop and its saves."""
    data = write_fake_imagefolder(tmp_path_factory.mktemp("tree"), classes=2, per_class=1, size=40)
    out = tmp_path_factory.mktemp("ilsvrc")
    epoch, best_epochs = [0], {}
    real_save = T.TrainingRun.save

    def save(self, ckpt, paths, e=None):  # which epoch the best file holds after each epoch
        real_save(self, ckpt, paths, e)
        best_epochs[e] = read_checkpoint(self.best_path)["epoch"] if os.path.exists(self.best_path) else None

    argv = [
        "--model=MobileNetV2",
        "--epochs=6",
        "--batch_size=2",
        "--visible_device=0,1,2,3",
        f"--dataset_path={data}",
        f"--output_dir={out}",
        *COMMON,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "0")
        mp.setenv("CI", "1")
        mp.setattr(T, "evaluate", _scripted_evaluate(ILSVRC_SCORES, epoch))
        mp.setattr(T.TrainingRun, "save", save)
        mp.setattr(T, "train_one_epoch", _no_training)
        _count_epochs(mp, epoch)
        code, printed = _train_printing("ilsvrc", argv)
    assert code == 0, printed[-2000:]
    return {"out": out, "stdout": printed, "best_epochs": best_epochs}


def test_ilsvrc_writes_a_history_file_every_5_epochs(ilsvrc_run):
    """SPEC section 7: ``...-{visible_device}epoch{e}.pth`` every 5 epochs, no separator before ``epoch``."""
    stem = "ILSVRC-MobileNetV2-S32-U1-L10-0,1,2,3"  # the ILSVRC defaults: --shared_rank=32 --unique_rank=1
    files = {f for f in os.listdir(ilsvrc_run["out"]) if f.endswith(".pth")}
    assert files == {f"{stem}.pth", f"{stem}-last.pth", f"{stem}epoch5.pth"}
    assert read_checkpoint(str(ilsvrc_run["out"] / f"{stem}epoch5.pth"))["epoch"] == 5
    assert ilsvrc_run["stdout"].count("Saving..\n") == 1  # SPEC section 6: "Saving.." on every 5th epoch


def test_an_equal_score_does_not_replace_the_best(ilsvrc_run):
    """SPEC section 5: "best" = the highest test top-1, strictly greater: epochs 2 and 4 tie it and do not replace
    the best file."""
    assert ilsvrc_run["best_epochs"] == {1: 1, 2: 1, 3: 3, 4: 3, 5: 3, 6: 3}
    assert ilsvrc_run["stdout"].count("Saving Best..") == 2
    result = json.loads(ilsvrc_run["stdout"].strip().splitlines()[-1])
    assert result["best_epoch"] == 3 and result["best_acc"] == 40.0


# ---------------------------------------------------------------------------------------------------------------------
# Top-5 in the evaluation's printout and JSON, by value
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_reports_top5_by_value(c10, tmp_path, capsys):
    """Every image gets the logits 10, 9, ..., 1 (fc weight 0, bias decreasing): top-1 is right only for class 0 and
    top-5 for classes 0-4. The 10 test images hold each class once, so top-1 = 10% and top-5 = 50%."""
    torch.manual_seed(0)
    model = get_model("ResNet20", "cifar10")
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10, 0, -1, dtype=torch.float32))
    path = str(tmp_path / "fixed.pth")
    save_checkpoint(make_checkpoint(model, None, epoch=1, acc=0.0), path)
    code = cli.eval_main("cifar10", [f"--pretrained={path}", f"--dataset_path={c10}", "--batch_size=4", *COMMON])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    for line in (
        "Eval_Acc_top1 = 10.000",
        "Eval_Acc_top5 = 50.000",
        "Eval_Err_top1 = 90.000",
        "Eval_Err_top5 = 50.000",
    ):
        assert line in lines, out
    result = json.loads(lines[-1])
    assert (result["top1"], result["top5"], result["top1_err"], result["top5_err"]) == (10.0, 50.0, 90.0, 50.0)


# ---------------------------------------------------------------------------------------------------------------------
# --resume across a CIFAR-100 stage boundary
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_across_a_cifar100_stage_boundary_is_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """--epochs=3 makes the stages epochs 1, 2, 3. Epoch 1 scores best (scripted), so stage 3 restarts from epoch 1's
    weights with a fresh SGD. A run stopped after epoch 2 and resumed must do the same: equal final weights, bit for
    bit, and the resumed epoch 3 starts from the best file's weights."""
    data = tmp_path / "c100"
    write_fake_cifar(data, "cifar100", n_train=4, n_test=2, seed=0)
    epoch, entries = [0], {}
    monkeypatch.setattr(T, "evaluate", _scripted_evaluate({1: 50.0, 2: 40.0, 3: 45.0}, epoch))
    real_begin = T.TrainingRun.begin_epoch
    real_end = T.TrainingRun.log_epoch

    def begin_epoch(self, e):  # the weights and optimizer the epoch's training starts from (after a restart)
        epoch[0] = e
        start = real_begin(self, e)
        entries[e] = ({k: v.clone() for k, v in self.model.state_dict().items()}, len(self.optimizer.state))
        return start

    def log_epoch(self, e, *rest, stop_after=None):  # the epoch's last hook
        real_end(self, e, *rest)
        if e == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run: it stops after this epoch

    monkeypatch.setattr(T.TrainingRun, "begin_epoch", begin_epoch)

    def train(out, *extra, stop_after=None):
        monkeypatch.setattr(
            T.TrainingRun, "log_epoch", lambda self, e, *rest: log_epoch(self, e, *rest, stop_after=stop_after)
        )
        argv = ["--model=MobileNetV2", "--epochs=3", "--batch_size=4", f"--dataset_path={data}", f"--output_dir={out}"]
        return cli.train_main("cifar100", argv + COMMON + list(extra))

    assert train(tmp_path / "whole") == 0
    whole = read_checkpoint(str(tmp_path / "whole" / "CIFAR100-MobileNetV2-S16-U1-L10-0-last.pth"))
    assert train(tmp_path / "split", stop_after=2) == 143
    entries.clear()
    assert train(tmp_path / "split", "--resume") == 0
    capsys.readouterr()
    assert list(entries) == [3]  # the resumed run trained epoch 3 only
    best = read_checkpoint(str(tmp_path / "split" / "CIFAR100-MobileNetV2-S16-U1-L10-0.pth"))
    assert best["epoch"] == 1
    weights, momentum_buffers = entries[3]
    assert all(torch.equal(weights[k], v) for k, v in best["net_state_dict"].items())  # from the best weights
    assert momentum_buffers == 0  # with a fresh SGD
    split = read_checkpoint(str(tmp_path / "split" / "CIFAR100-MobileNetV2-S16-U1-L10-0-last.pth"))
    assert split["epoch"] == whole["epoch"] == 3
    for k, v in whole["net_state_dict"].items():
        assert torch.equal(split["net_state_dict"][k], v), k
