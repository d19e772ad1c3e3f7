"""DistributedDataParallel under torchrun (CPU, gloo): sharding, synchronised BatchNorm, and the equivalence of
2 processes x batch b (``--sync_bn``) with 1 process x batch 2b, including the regulariser's gradient (counted once)
and exact evaluation over a test set whose size is not divisible by the number of processes.

The end-to-end comparison runs the real training script under ``python -m torch.distributed.run`` with two test-only
changes: the CIFAR batches come from the GPU-resident loader (run on the CPU), whose crop/flip draws are a function of
(seed, epoch, position) only, so both set-ups augment every image identically (the DataLoader path draws from each
process's global RNG, which two processes cannot reproduce); and everything runs in float64. In float32 the two runs
drift apart by about 1e-4 after a few steps on these tiny, freshly initialised networks, from rounding alone: the
BatchNorm backward at initialisation is ill-conditioned (one process's native BatchNorm is itself 3e-4 away from the
float64 gradient for ResNet20, while the 2-process gradient is 3e-7 away), so float32 cannot show whether the
maths is the same. In float64 the two runs agree to about 1e-12.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T

try:
    from tests.cpu_sync_bn import LAUNCHER
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from cpu_sync_bn import LAUNCHER
    from fakedata import write_fake_cifar

from utils import data as D
from utils import distributed
from utils.gpu_loader import GpuCifarLoader

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)

# Runs a script with torch's SyncBatchNorm made to run on the CPU (tests/cpu_sync_bn.py), the loaders forced onto the
# GPU-resident CIFAR path (identical augmentation) and everything in float64.
RUNNER = LAUNCHER.replace(
    "cpu_sync_bn.install()\n",
    """cpu_sync_bn.install()
import functools, torch
import utils.gpu_loader, utils.train
torch.set_default_dtype(torch.float64)
utils.train.build_loaders = functools.partial(utils.train.build_loaders, gpu_pipeline=True)
utils.gpu_loader.normalize = lambda images, mean, std: images.to(torch.float64).div_(255).sub_(mean).div_(std)
""",
).format(tests=str(REPO / "tests"))


# ---------------------------------------------------------------------------------------------------------------------
# Sharding (in-process)
# ---------------------------------------------------------------------------------------------------------------------


def _steps(batches_per_rank):
    """Per step: the union (as a sorted list) of what every rank's k-th batch holds."""
    return [sorted(sum((b[k] for b in batches_per_rank), [])) for k in range(len(batches_per_rank[0]))]


@pytest.mark.parametrize("n", [32, 37])
def test_distributed_sampler_matches_single_process_batches(n):
    ds = list(range(n))

    def loader(bs, rank=0, world=1):
        return D.TrainLoader(
            D.SeededSamples(ds, seed=5), batch_size=bs, sampler=D.EpochSampler(ds, seed=5, rank=rank, world_size=world)
        )

    single, shards = loader(8), [loader(4, r, 2) for r in range(2)]
    for epoch in (1, 2):
        single.set_epoch(epoch)
        ref = [b.tolist() for b in single]
        got = []
        for s in shards:
            s.set_epoch(epoch)
            got.append([b.tolist() for b in s])
        assert len(got[0]) == len(got[1])  # every rank runs the same number of steps
        seen = sum((sum(g, []) for g in got), [])
        assert set(seen) == set(range(n)) and len(seen) == 2 * -(-n // 2)  # padded: every image, a few twice
        if n % 8 == 0:  # the ranks' k-th batches together hold the single process's k-th batch
            assert _steps(got) == [sorted(b) for b in ref]
    # evaluation shards: no padding, disjoint, everything once
    images = torch.zeros(n, 32, 32, 3, dtype=torch.uint8)
    tests = [D._eval_loader(D.CifarDataset(images, torch.arange(n), T.ToTensor()), 4, 0, False, r, 2) for r in range(2)]
    items = [torch.cat([y for _, y in t]).tolist() for t in tests]
    assert sorted(items[0] + items[1]) == list(range(n)) and not set(items[0]) & set(items[1])


def test_gpu_loader_shards_reproduce_single_process_batches():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(24)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    single = GpuCifarLoader(images, labels, 8, train=True, **kw)
    shards = [GpuCifarLoader(images, labels, 4, train=True, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in (single, *shards):
        loader.set_epoch(4)
    ref = list(single)
    got = [list(s) for s in shards]
    assert len(ref) == len(got[0]) == len(got[1]) == 3
    for k, (x, y) in enumerate(ref):
        xs = torch.cat([got[0][k][0], got[1][k][0]])
        ys = torch.cat([got[0][k][1], got[1][k][1]])
        order, back = y.argsort(), ys.argsort()
        assert torch.equal(y[order], ys[back])
        assert torch.equal(x[order], xs[back])  # same images with the same crop/flip
    # test mode, 24 images over 2 ranks of batch 5: disjoint and complete, no padding
    tests = [GpuCifarLoader(images, labels, 5, train=False, rank=r, world_size=2, **kw) for r in range(2)]
    seen = [torch.cat([y for _, y in t]).tolist() for t in tests]
    assert sorted(seen[0] + seen[1]) == list(range(24)) and not set(seen[0]) & set(seen[1])


def test_convert_sync_batchnorm_keeps_tensors_and_sharing(monkeypatch):
    from models import get_model

    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    before = dict(model.state_dict(keep_vars=True))
    n_params = len(list(model.parameters()))  # shared bases counted once
    with pytest.raises(distributed.DistError, match="--sync_bn needs CUDA"):
        distributed.convert_sync_batchnorm(model, "cpu")
    monkeypatch.setattr(distributed, "SYNC_BN_DEVICES", ("cuda", "cpu"))
    model = distributed.convert_sync_batchnorm(model, "cpu")
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) > 30
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # same tensors
    assert len(list(model.parameters())) == n_params  # the shared bases are still one tensor each
    # a single process: plain BatchNorm behaviour
    x = torch.randn(4, 3, 32, 32)
    ref = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=1, unique_rank=1)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), ref(x))


def test_batch_size_must_divide_over_processes(monkeypatch, capsys, tmp_path):
    from utils import cli

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    code = cli.train_main("cifar10", ["--batch_size=30", "--device=cpu", f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "--batch_size=30 is the global batch" in err and "--batch_size=32 or 28" in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# torchrun end to end
# ---------------------------------------------------------------------------------------------------------------------


def _run(args, timeout=300):
    p = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"{args}\nexit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The same 3-epoch run (6 SGD steps of global batch 16, 7 of 39 training images held out for validation, 33
    test images) as 1 process x 16 and as 2 processes x 8 with --sync_bn, concurrently."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_fake_cifar(root / "c10", "cifar10", n_train=39, n_test=33, seed=1)
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    flags = [
        "--model=ResNet32_DoubleShared",
        "--shared_rank=2",
        "--unique_rank=1",
        "--epochs=3",
        "--batch_size=16",
        "--lr=0.05",
        "--lambdaR=10",
        "--val_split=7",
        "--seed=2",
        f"--dataset_path={root / 'c10'}",
        "--device=cpu",
        "--num_workers=0",
    ]
    jobs = {
        "one": [runner, "train_cifar10.py", *flags, f"--output_dir={root / 'one'}"],
        "two": [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            runner,
            "train_cifar10.py",
            *flags,
            "--sync_bn",
            f"--output_dir={root / 'two'}",
        ],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(jobs, pool.map(_run, jobs.values())))
    stem = "CIFAR10-ResNet32_DoubleShared-S2-U1-L10-0"
    assert data
    return {"root": root, "stem": stem, **done}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_two_processes_reproduce_one_process_with_twice_the_batch(ddp_runs):
    r = ddp_runs
    one = _load(r["root"] / "one" / f"{r['stem']}-last.pth")
    two = _load(r["root"] / "two" / f"{r['stem']}-last.pth")
    assert one["epoch"] == two["epoch"] == 3 and two["world_size"] == 2 and len(two["rng_states"]) == 2
    a, b = one["net_state_dict"], two["net_state_dict"]
    init = _initial_weights()
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a if k.endswith("weight"))
    assert moved > 1e-3  # training did change the weights
    assert a["conv1.weight"].dtype == torch.float64
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert max((b[k].double() - a[k].double()).abs().max().item() for k in a) < 1e-9  # in fact: rounding only
    # momentum buffers too (the regulariser's gradient counted once, not once per process)
    for i, s in one["optimizer_state_dict"]["state"].items():
        torch.testing.assert_close(
            two["optimizer_state_dict"]["state"][i]["momentum_buffer"], s["momentum_buffer"], rtol=0, atol=1e-5
        )


def _initial_weights():
    from models import get_model

    torch.manual_seed(2)
    return get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1).state_dict()


@pytest.mark.slow
def test_two_process_output_and_exact_sharded_evaluation(ddp_runs):
    """Rank 0 alone prints; validation (7 images) and test (33 images) are scored exactly over 2 ranks (unpadded
    shards, summed counts): the same numbers as one process."""
    r = ddp_runs
    two, one = r["two"].stdout, r["one"].stdout
    assert two.count("Basis Epoch: 1") == 1 and "DDP 2 processes x batch 8 sync BN" in two
    assert "32 train / 7 val (held out" in two and "33 test images" in two
    for label in ("Best_Val_Acc_top1", "Best_Val_Acc_top5", "Test_Acc_top1", "Test_Acc_top5"):
        lines = [x for x in two.splitlines() if x.startswith(label + " = ")]
        assert lines and lines == [x for x in one.splitlines() if x.startswith(label + " = ")], label
    for line in one.splitlines():  # every epoch's validation numbers (and losses) as printed
        if line.startswith("[epoch "):
            fields = line.split(" | ")
            match = [x for x in two.splitlines() if x.startswith(fields[0])][0].split(" | ")
            assert fields[2] == match[2] and fields[3] == match[3]
    best = _load(r["root"] / "two" / f"{r['stem']}.pth")
    ref = _load(r["root"] / "one" / f"{r['stem']}.pth")
    assert best["val_split"] == ref["val_split"] and best["val_split"]["n"] == 7 and best["selection"] == "val"
    assert best["epoch"] == ref["epoch"] and float(best["test_acc"]) == float(ref["test_acc"])
    hits = best["test_acc"] * 33 / 100  # a whole number of the 33 images: no image counted twice or missed
    assert 0 <= hits <= 33 and abs(hits - round(hits)) < 1e-9


@pytest.mark.slow
def test_torchrun_imagefolder_dataloader_path(tmp_path):
    """The DataLoader path (DistributedSampler over an ImageFolder, ILSVRC transforms) with a held-out split of
    train/: 2 processes, one printed log, checkpoints from rank 0 with both processes' RNG states."""
    try:
        from tests.fakedata import write_fake_imagefolder
    except ImportError:  # pragma: no cover
        from fakedata import write_fake_imagefolder

    write_fake_imagefolder(tmp_path / "in", classes=2, per_class=4, size=36, seed=0)
    p = _run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_ilsvrc.py",
            "--model=MobileNetV2_Shared",
            "--epochs=1",
            "--batch_size=4",
            "--val_split=3",
            f"--dataset_path={tmp_path / 'in'}",
            f"--output_dir={tmp_path / 'out'}",
            "--device=cpu",
            "--num_workers=0",
        ]
    )
    out = p.stdout
    assert out.count("\nBasis Epoch: 1") == 1 and "DDP 2 processes x batch 2" in out
    assert "5 train / 3 val (held out" in out and "8 test images" in out
    assert "Val_Acc_Top1/5 = " in out and "Test_Acc_Top1/5" not in out and "Test_Acc_top1 = " in out
    ckpt = _load(tmp_path / "out" / "ILSVRC-MobileNetV2_Shared-S32-U1-L10-0-last.pth")
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert ckpt["val_split"]["n"] == 3


@pytest.mark.slow
def test_a_rank_without_peers_says_whom_it_waits_for(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **ENV,
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "train_cifar10.py", "--device=cpu", f"--output_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        start, line = time.time(), ""
        while "waiting" not in line and time.time() - start < 60:
            line = proc.stderr.readline()
        assert "rank 1: waiting for the other 1 process(es) of WORLD_SIZE=2 at 127.0.0.1" in line, line
    finally:
        proc.kill()
        proc.wait()


def _pid_of_rank(marker: str, rank: int):
    """The pid of the torchrun worker whose command line holds ``marker`` and whose environment says RANK=rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and f"RANK={rank}".encode() in env and b"train_cifar10.py" in cmd:
            return int(pid)
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_ranks_at_one_step_with_one_line_each(tmp_path):
    """Slurm may signal one process of a job: every rank stops at the same step, the step is saved, and each rank
    prints at most one line (no gloo traceback)."""
    import signal
    import time

    data = tmp_path / "c10"
    write_fake_cifar(data, "cifar10", n_train=64, n_test=16, seed=1)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_cifar10.py",
            "--model=ResNet32_DoubleShared",
            "--shared_rank=1",
            "--unique_rank=1",
            "--epochs=500",
            "--batch_size=8",
            f"--dataset_path={data}",
            f"--output_dir={out}",
            "--device=cpu",
            "--num_workers=0",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        last = out / "CIFAR10-ResNet32_DoubleShared-S1-U1-L10-0-last.pth"
        deadline = time.time() + 180
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        pid = _pid_of_rank(str(out), 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        err = proc.communicate(timeout=180)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    ours = [line for line in err.splitlines() if line.startswith("train_cifar10.py") and "FAILED" not in line]
    assert len(ours) == 2 and all("interrupted by SIGTERM" in line for line in ours), err[-3000:]
    # no worker traceback (torchrun prefixes those with [rankN]:); torchrun's own agent still reports the exit status
    assert "[rank0]:" not in err and "[rank1]:" not in err and "gloo" not in err.lower(), err[-3000:]
    said = {re.sub(r"^train_cifar10\.py( \[rank 1\])?: ", "", line) for line in ours}
    assert len(said) == 1, ours  # both ranks stopped at the same point and say so
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert len(ckpt["rng_states"]) == 2  # both ranks took part in that save
    (message,) = said
    mid_epoch = re.search(r"during epoch (\d+): its first (\d+) of \d+ steps are saved", message)
    if mid_epoch:  # the checkpoint holds exactly the step every rank named: "epoch" is the last completed one
        assert (ckpt["epoch"], ckpt["epoch_step"]) == (int(mid_epoch[1]) - 1, int(mid_epoch[2])), message
    else:
        after = re.search(r"after epoch (\d+)", message)
        assert after and (ckpt["epoch"], ckpt["epoch_step"]) == (int(after[1]), 0), message
