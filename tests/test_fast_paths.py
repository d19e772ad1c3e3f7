"""The opt-in fast paths run on CPU: bf16 autocast, channels_last, torch.compile; and the benchmark does not rot."""
import torch

from models import OrthogonalityRegularizer, get_model
from utils.engine import Precision, train_one_epoch, wrap_model


def _batches(n=2, size=4, classes=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _step(model, net, precision, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train_one_epoch(net, model, _batches(), opt, device=torch.device("cpu"),
                           regularizer=OrthogonalityRegularizer(model, True), lambda_r=10.0, precision=precision,
                           print_first=False, channels_last=channels_last)


def test_amp_bf16_training_step_on_cpu():
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    dtypes = []
    model.layer2[1].coeff_conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    precision = Precision.make(True, torch.device("cpu"))
    assert precision.dtype == torch.bfloat16 and precision.scaler is None
    before = model.shared_basis_2_1.weight.detach().clone()
    stats = _step(model, model, precision)
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


def test_compile_training_step_on_cpu():
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    warnings = []
    net = wrap_model(model, torch.device("cpu"), compile=True)
    if hasattr(net, "warn"):
        net.warn = warnings.append
    eager = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=2, unique_rank=1)
    eager.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in eager.parameters()]
    stats = _step(model, net, Precision())
    ref = _step(eager, eager, Precision())
    assert not warnings, warnings  # compiled, not the eager fallback
    assert abs(stats["loss"] - ref["loss"]) < 1e-3
    # Compiled kernels round differently and BatchNorm on 4 images amplifies it: compare the update direction.
    delta = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), eager.parameters())])
    step = torch.cat([(q - p0).flatten() for q, p0 in zip(eager.parameters(), start)])
    assert delta.norm() < 0.05 * step.norm()


def test_benchmark_runs(capsys):
    from utils import benchmark

    benchmark.main(["--model", "ResNet32_DoubleShared", "--shared_rank", "2", "--unique_rank", "1", "--reps", "1",
                    "--warmup", "0", "--batch_size", "2", "--eval_batch_size", "2"])
    out = capsys.readouterr().out
    for line in ("straightforward (authors' form)", "plain ResNet32", "fast without one conv over",
                 "fast without batched regulariser", "folded (models.fold)"):
        assert line in out


def test_benchmark_data_mode_runs(capsys):
    from utils import benchmark

    benchmark.main(["--data", "--device", "cpu", "--model", "ResNet32_DoubleShared", "--shared_rank", "2",
                    "--unique_rank", "1", "--data_images", "256", "--data_test_images", "128", "--batch_size", "64",
                    "--num_workers", "0", "--data_epochs", "1", "--data_warmup", "0"])
    out = capsys.readouterr().out
    for line in ("256 train / 128 test images", "Whole epochs (train + test pass)", "straightforward (authors' form)",
                 "fast path", "EpochDataLoader", "fast / straightforward:", "x training throughput",
                 "300 epochs = 300 x (train epoch x 50000/256 + test pass x 10000/128)"):
        assert line in out, line
