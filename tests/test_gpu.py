"""The CUDA paths end to end on small synthetic CIFAR-format data (skipped without CUDA: see conftest.py).

Two epochs with the GPU-resident loader, autocast, channels_last and torch.compile; the checkpoints load on a CPU with
``weights_only=True``; the folded evaluation reproduces the accuracy training reported; torchrun with one NCCL process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from fakedata import write_fake_cifar

from models import load_model
from utils import cli, engine
from utils.evaluate import evaluate_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--model=ResNet32_DoubleShared",
    "--shared_rank=4",
    "--unique_rank=1",
    "--epochs=2",
    "--batch_size=64",
    "--lambdaR=10",
    "--device=cuda",
    "--num_workers=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_fake_cifar(root, "cifar10", n_train=600, n_test=200, seed=0)
    return root


@pytest.mark.parametrize("fast", [[], ["--amp", "--channels_last", "--compile"]], ids=["fp32", "amp-cl-compile"])
def test_two_epochs_on_the_gpu_then_eval_on_the_gpu_and_load_on_cpu(data, tmp_path, fast, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    args = cli.parse_train_args(
        "cifar10", [*FLAGS, *fast, f"--dataset_path={data}", f"--output_dir={tmp_path}"], prog="train_cifar10.py"
    )
    result = engine.fit(args)
    assert result["best_acc"] > 10.0  # above chance on learnable data after 2 epochs
    ckpt = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["net_state_dict"].values())
    model, _ = load_model(result["best_checkpoint"])  # builds on the CPU from the file alone
    assert next(model.parameters()).device.type == "cpu"
    for fold in ([], ["--no_fold"]):
        eval_args = cli.parse_eval_args(
            "cifar10",
            [
                f"--pretrained={result['best_checkpoint']}",
                "--device=cuda",
                f"--dataset_path={data}",
                "--num_workers=0",
                *fold,
                *[f for f in fast if f != "--compile"],
            ],
        )
        scored = evaluate_checkpoint(eval_args)
        assert scored["top1"] == pytest.approx(result["best_acc"], abs=0.5 if fast else 1e-6)


def test_torchrun_on_the_gpus(data, tmp_path):
    """One process per GPU, up to two (NCCL joins when there are two; one process runs without a process group)."""
    procs = min(2, torch.cuda.device_count())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "train_cifar10.py",
        *FLAGS,
        "--amp",
        f"--dataset_path={data}",
        f"--output_dir={tmp_path}",
    ]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")][-1]
    ckpt = torch.load(last["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt.get("world_size", 1) == procs
