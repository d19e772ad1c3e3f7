"""The opt-in fast paths run on CPU: bf16 autocast, channels_last, torch.compile; and the benchmark does not rot."""

import threading

import pytest
import torch

from models import OrthogonalityRegularizer, get_model
from utils.engine import Precision, train_one_epoch, wrap_model


def _batches(n=2, size=4, classes=10):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)
    ]


def _step(model, net, precision, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train_one_epoch(
        net,
        model,
        _batches(),
        opt,
        device=torch.device("cpu"),
        regularizer=OrthogonalityRegularizer(model, True),
        lambda_r=10.0,
        precision=precision,
        print_first=False,
        channels_last=channels_last,
    )


def test_amp_bf16_training_step_on_cpu():
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    dtypes = []
    model.layer2[1].coeff_conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    precision = Precision.make(True, torch.device("cpu"))
    assert precision.dtype == torch.bfloat16 and precision.scaler is None
    before = model.shared_basis_2_1.weight.detach().clone()
    stats = _step(model, wrap_model(model, torch.device("cpu"), precision), precision)
    assert torch.bfloat16 in dtypes  # autocast really ran the convs in bf16
    assert stats["images"] == 8 and torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(before, model.shared_basis_2_1.weight)  # the shared basis was updated
    assert model.shared_basis_2_1.weight.dtype == torch.float32  # master weights stay fp32


def test_channels_last_training_step_on_cpu():
    torch.manual_seed(0)
    model = get_model("ResNet32_SingleShared", "cifar10", shared_rank=2, unique_rank=1)
    model = model.to(memory_format=torch.channels_last)
    stats = _step(model, model, Precision(), channels_last=True)
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_autocast_reaches_replica_threads():
    """DataParallel runs replicas in worker threads, which do not inherit the caller's autocast state: the wrapper
    enters autocast inside the module's forward, so a replica computes in the dtype the run chose."""
    model = get_model("ResNet20", "cifar10").eval()
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append((threading.current_thread().name, o.dtype)))
    net = wrap_model(model, torch.device("cpu"), Precision(torch.bfloat16))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        thread = threading.Thread(target=net, args=(x,), name="replica")
        thread.start()
        thread.join()
        model(x)  # the bare model, outside any autocast: fp32
    assert seen == [("replica", torch.bfloat16), ("MainThread", torch.float32)]


def test_bf16_choice_ignores_emulation(monkeypatch):
    """A GPU that only emulates bf16 (V100, T4) gets fp16 + GradScaler; one with native bf16 gets bf16."""
    calls = []

    def fake_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: threading.Lock())  # no GPU to select here
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: "scaler")
    p = Precision.make(True, torch.device("cuda", 1))
    assert calls == [False] and p.dtype == torch.float16 and p.scaler == "scaler"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert Precision.make(True, torch.device("cuda", 0)).dtype == torch.bfloat16
    assert Precision.make(False, torch.device("cuda", 0)).dtype is None


@pytest.mark.slow
def test_compile_training_step_on_cpu():
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    net = wrap_model(model, torch.device("cpu"), Precision(), compile=True)
    eager = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    eager.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in eager.parameters()]
    stats = _step(model, net, Precision())
    ref = _step(eager, eager, Precision())
    assert isinstance(net.compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert abs(stats["loss"] - ref["loss"]) < 1e-3
    # Compiled kernels round differently and BatchNorm on 4 images amplifies it: compare the update direction.
    delta = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), eager.parameters())])
    step = torch.cat([(q - p0).flatten() for q, p0 in zip(eager.parameters(), start)])
    assert delta.norm() < 0.05 * step.norm()
    torch._dynamo.utils.counters.clear()
    net(torch.randn(3, 3, 32, 32))  # the short last batch: the batch dimension is dynamic, no recompile
    assert net.compiled is not None and torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) == 0


def test_a_later_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    calls = []

    def compiled(x):
        calls.append(x.shape[0])
        if len(calls) > 1:
            raise RuntimeError("inductor: cannot lower this\nmore lines of the backend's report")
        return model(x)

    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled)
    model = get_model("ResNet20", "cifar10").eval()
    net = wrap_model(model, torch.device("cpu"), Precision(), compile=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(net(x), model(x))
    assert calls == [2, 2]  # compiled once fine, failed once, then eager only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile failed (RuntimeError: inductor: cannot lower this)" in err


def test_out_of_memory_in_a_compiled_call_is_not_a_compile_failure(monkeypatch, capsys):
    calls = []

    def compiled(x):
        calls.append(x.shape[0])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(x)

    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled)
    model = get_model("ResNet20", "cifar10").eval()
    net = wrap_model(model, torch.device("cpu"), Precision(), compile=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        net(x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
    assert calls == [2, 2] and capsys.readouterr().err == ""  # still compiled, no warning


@pytest.mark.slow
def test_benchmark_runs(capsys):
    from utils import benchmark

    benchmark.main(
        [
            "--model",
            "ResNet32_DoubleShared",
            "--shared_rank",
            "2",
            "--unique_rank",
            "1",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--batch_size",
            "2",
            "--eval_batch_size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    for line in (
        "straightforward (authors' form)",
        "plain ResNet32",
        "fast without one conv over",
        "fast without batched regulariser",
        "folded (models.fold)",
    ):
        assert line in out


@pytest.mark.slow
def test_benchmark_data_mode_runs(capsys):
    from utils import benchmark

    benchmark.main(
        [
            "--data",
            "--device",
            "cpu",
            "--model",
            "ResNet32_DoubleShared",
            "--shared_rank",
            "2",
            "--unique_rank",
            "1",
            "--data_images",
            "256",
            "--data_test_images",
            "128",
            "--batch_size",
            "64",
            "--num_workers",
            "0",
            "--data_epochs",
            "1",
            "--data_warmup",
            "0",
        ]
    )
    out = capsys.readouterr().out
    for line in (
        "256 train / 128 test images",
        "Whole epochs (train + test pass)",
        "straightforward (authors' form)",
        "fast path",
        "TrainLoader",
        "fast / straightforward:",
        "x training throughput",
        "300 epochs = 300 x (train epoch x 50000/256 + test pass x 10000/128)",
    ):
        assert line in out, line


def test_benchmark_without_cuda_is_one_line(capsys):
    from utils import benchmark

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--data", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "--device=cpu" in err, err
