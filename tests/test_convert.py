"""models.convert: a trained plain ResNet -> its shared-basis counterpart by SVD (issue 28).

Facts used, independent of the code under test: a stack of n filters has rank at most n, so a basis of n orthonormal
rows reproduces it exactly and fewer cannot (for generic, full-rank weights); the best rank-s approximation of a
matrix leaves exactly its singular values beyond s (Eckart-Young); R of paper eq. 5 is zero
for orthonormal rows; a BatchNorm whose weight is sqrt(var + eps) and bias mean, in train mode on the batch whose
statistics those are, returns its input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models import OrthogonalityRegularizer, get_model
from models.convert import (
    calibrate_basis_bn_,
    convert,
    converted_checkpoint,
    factorise_,
    factorised_positions,
    load_plain,
    main,
    save_converted,
)
from models.pretrained import load_model


def trained_like(name: str, dataset: str = "cifar10", seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A plain model with random weights and random BN statistics and affines (as a trained network has)."""
    torch.manual_seed(seed)
    model = get_model(name, dataset).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def images(n: int = 2, dtype=torch.float64, seed: int = 1) -> list[torch.Tensor]:
    return [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)]


@pytest.fixture(scope="module")
def plain32(one_thread):
    return trained_like("ResNet32")


# ResNet32's shared blocks 2..5 of a group: 4 blocks x 16 filters of group 1 per position. A stack per position
# (DoubleShared) has 64 rows, a stack of both positions (SingleShared) 128; groups 2 and 3 scale both sides by k = 2, 4
# (32/64 planes, 9 x 32/64 columns), so the same s + u decides every group. s + u = rows: exact; one less: not.
@pytest.mark.parametrize(
    "name, exact, short",
    [
        ("ResNet32_DoubleShared", dict(shared_rank=63, unique_rank=1), dict(shared_rank=62, unique_rank=1)),
        pytest.param(
            "ResNet32_SingleShared",
            dict(shared_rank=127, unique_rank=1),
            dict(shared_rank=126, unique_rank=1),
            marks=pytest.mark.slow,
        ),
        pytest.param("ResNet32_SharedOnly", dict(shared_rank=64), dict(shared_rank=63), marks=pytest.mark.slow),
    ],
)
def test_exact_when_the_ranks_cover_each_stack_and_not_below(plain32, name, exact, short):
    x = images()
    with torch.no_grad():
        want = plain32(x[0])
    for ranks, is_exact in ((exact, True), (short, False)):
        target = get_model(name, "cifar10", **ranks).double()
        factorise_(plain32.state_dict(), target)
        with torch.no_grad():
            for key, value in plain32.state_dict().items():  # what convert copies: every other tensor
                if key in target.state_dict():
                    target.state_dict()[key].copy_(value)
            got = target.eval()(x[0])
        error = float((got - want).abs().max() / want.abs().max())
        assert (error < 1e-6) == is_exact, (ranks, error)


@pytest.mark.slow
def test_resnet56_double_shared_is_exact_at_s127u1_through_convert():
    """The issue's example: ResNet56 has 8 shared blocks per group, a position's stack 8 x 16 = 128 rows, so S127U1
    (s + u = 128) reproduces the plain network; S126U1 does not."""
    plain = trained_like("ResNet56")
    x = images()
    for s, is_exact in ((127, True), (126, False)):
        target = get_model("ResNet56_DoubleShared", "cifar10", shared_rank=s, unique_rank=1).double()
        report = convert(plain, target, x)
        assert (report["logit_max_abs_diff"] < 1e-6 * report["images"]) == is_exact, report["logit_max_abs_diff"]
        assert report["top1_agreement"] == 100.0 or not is_exact


def test_convert_reports_exactness_copies_every_tensor_and_counts(plain32):
    target = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=63, unique_rank=1).double()
    report = convert(plain32, target, images())
    assert report["logit_rel_error"] < 1e-9 and report["top1_agreement"] == 100.0
    assert len(report["position_rel_error"]) == 3 * 4 * 2  # 3 groups x 4 shared blocks x 2 positions
    assert max(err for _, err in report["position_rel_error"]) < 1e-9
    plain_state, state = plain32.state_dict(), target.state_dict()
    copied = [k for k in plain_state if k in state]
    assert len(copied) == len(plain_state) - 3 * 4 * 2  # all but the factorised 3x3 kernels
    for key in copied:
        assert torch.equal(state[key], plain_state[key]), key
    # README's counts: ResNet32 (0.46M), and 0.24M params / 0.16 GFLOPs for ResNet32-S16U1*; here S63 builds more.
    assert report["params_before"] == 464_154 and report["params_after"] == sum(p.numel() for p in target.parameters())
    assert report["flops_before"] == pytest.approx(0.14e9, rel=0.05)


def test_relative_error_falls_as_the_shared_rank_grows(plain32):
    errors = []
    for s in (1, 4, 16, 48):
        target = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=s, unique_rank=1).double()
        errors.append(torch.tensor([e for _, e in factorise_(plain32.state_dict(), target)]))
    for smaller, larger in zip(errors, errors[1:]):
        assert (larger <= smaller + 1e-12).all() and larger.mean() < smaller.mean() - 0.01


def test_shared_only_error_is_the_stack_tail_eckart_young(plain32):
    s = 8
    target = get_model("ResNet32_SharedOnly", "cifar10", shared_rank=s).double()
    errors = dict(factorise_(plain32.state_dict(), target))
    state = plain32.state_dict()
    for g, k in ((1, 1), (2, 2), (3, 4)):
        for i in (1, 2):
            names = [f"layer{g}.{b}.conv{i}" for b in range(1, 5)]
            kernels = [state[f"{n}.weight"].flatten(1) for n in names]
            sigma = torch.linalg.svdvals(torch.cat(kernels))
            tail = float(sigma[s * k :].square().sum().sqrt())
            ours = sum((errors[n] * float(w.norm())) ** 2 for n, w in zip(names, kernels)) ** 0.5
            assert ours == pytest.approx(tail, rel=1e-9)


def gram_minus_identity(rows: torch.Tensor) -> float:
    rows = rows.detach()
    return float((rows @ rows.t() - torch.eye(rows.shape[0], dtype=rows.dtype)).abs().max())


@pytest.mark.parametrize("name", ["ResNet32_SingleShared", "ResNet32_DoubleShared"])
def test_shared_rows_orthonormal_unique_rows_outside_them(plain32, name):
    target = get_model(name, "cifar10", shared_rank=8, unique_rank=2).double()
    factorise_(plain32.state_dict(), target)
    for members in factorised_positions(target):
        shared = members[0][1].shared.weight.detach().flatten(1)
        assert gram_minus_identity(shared) < 1e-12
        for _, position in members:
            unique = position.unique.weight.detach().flatten(1)
            assert gram_minus_identity(unique) < 1e-12
            assert float((unique @ shared.t()).abs().max()) < 1e-12
            bn = position.basis_bn  # identity in eval mode: mean 0, var 1, weight sqrt(1 + eps), bias 0
            assert not bn.running_mean.any() and torch.equal(bn.running_var, torch.ones_like(bn.running_var))
            assert torch.allclose(bn.weight, torch.full_like(bn.weight, (1 + bn.eps) ** 0.5)) and not bn.bias.any()
    if name == "ResNet32_SingleShared":  # one basis per group: every row the regulariser sees is orthonormal
        assert float(OrthogonalityRegularizer(target)().detach()) < 1e-20


def test_calibrated_basis_bn_is_identity_in_eval_and_in_train_on_its_batch(plain32):
    target = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=8, unique_rank=1).double()
    convert(plain32, target, images())
    x = images(4, seed=2)
    with torch.no_grad():
        before = target.eval()(x[0])
        assert calibrate_basis_bn_(target, x) == 4
        after = target.eval()(x[0])
        assert (after - before).abs().max() < 1e-9 * before.abs().max()
        bns = [p.basis_bn for members in factorised_positions(target) for _, p in members]
        assert all(bn.running_var.min() > 0 and bn.running_mean.abs().max() > 0 for bn in bns)
        for bn in bns:
            bn.train()  # what fine-tuning sees: batch statistics, here the calibration batch's own
        in_train = target(x[0])
    assert (in_train - before).abs().max() < 1e-6 * before.abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# Files: formats, the output, bad input
# ---------------------------------------------------------------------------------------------------------------------


def project_checkpoint(model: nn.Module, **extra) -> dict:
    cfg = model.cfg
    return {
        "net_state_dict": model.float().state_dict(),
        "model": cfg.name,
        "dataset": cfg.dataset,
        "model_kwargs": dict(cfg.build_kwargs()),
        "acc": torch.tensor(50.0),
        "epoch": 3,
        **extra,
    }


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("plain")
    model = trained_like("ResNet32", dtype=torch.float32)
    torch.save(project_checkpoint(model), root / "ours.pth")
    torch.save({"net_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "authors.pth")
    shared = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=4, unique_rank=1)
    torch.save(project_checkpoint(shared), root / "shared_ours.pth")
    torch.save({"net_state_dict": shared.state_dict()}, root / "shared_authors.pth")
    torch.save(project_checkpoint(get_model("ResNet20", "cifar10")), root / "resnet20.pth")
    return root, model


def test_cli_writes_this_projects_checkpoint_that_loads_and_evaluates(plain_files, tmp_path, capsys):
    root, plain = plain_files
    out = tmp_path / "shared.pth"
    argv = ["--from", str(root / "authors.pth"), "--model", "ResNet32-DoubleShared", "--shared_rank", "4"]
    assert main([*argv, "--unique_rank", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer3.4.conv2" in printed and "params 464,154 -> " in printed and f"wrote {out}" in printed
    ckpt = torch.load(out, weights_only=True)
    assert (ckpt["model"], ckpt["dataset"], ckpt["model_kwargs"]) == (
        "ResNet32_DoubleShared",
        "cifar10",
        {"shared_rank": 4, "unique_rank": 1},
    )
    model, _ = load_model(out)  # the path of eval_cifar10.py, train --pretrained, hub and export
    report = ckpt["converted_from"]
    with torch.no_grad():
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        agree = (model(x).argmax(1) == plain.float().eval()(x).argmax(1)).float().mean() * 100
    assert float(agree) == pytest.approx(report["top1_agreement"])  # the report's random inputs are these
    assert main([*argv, "--out", str(out)]) == 1  # refuses to overwrite
    assert "exists" in capsys.readouterr().err


def test_this_projects_file_and_a_file_with_the_converted_record(plain_files, tmp_path):
    root, _ = plain_files
    plain, target, kind = load_plain(str(root / "ours.pth"), "ResNet32_SingleShared", shared_rank=2, unique_rank=1)
    assert kind == "this project's" and plain.cfg.name == "ResNet32" and target.cfg.shared_rank == 2
    report = convert(plain, target)
    save_converted(converted_checkpoint(target, report, str(root / "ours.pth")), str(tmp_path / "c.pth"))
    again, _ = load_model(tmp_path / "c.pth")
    for (k, a), b in zip(target.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def torchvision_resnet(name: str, seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)  # built locally, nothing downloaded
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.slow  # builds two ResNet34s (several seconds on a busy 2-core CPU)
def test_torchvision_resnet34_keys_map_onto_the_ilsvrc_resnet34(tmp_path, one_thread):
    tv = torchvision_resnet("resnet34")
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    plain, target, kind = load_plain(str(tmp_path / "tv.pth"), "ResNet34_DoubleShared", shared_rank=32, unique_rank=1)
    assert kind == "torchvision" and (plain.cfg.dataset, plain.cfg.name, target.cfg.name) == (
        "ilsvrc",
        "ResNet34",
        "ResNet34_DoubleShared",
    )
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(x), tv(x), atol=1e-5, rtol=1e-5)  # the same network, weight for weight


BAD = [
    # (file, --model, extra flags, what the one line says)
    ("shared_ours.pth", "ResNet32_DoubleShared", [], "not a plain network"),
    ("shared_authors.pth", "ResNet32_DoubleShared", [], "not a plain network"),
    ("resnet20.pth", "ResNet32_DoubleShared", [], "no shared counterpart"),
    ("ours.pth", "ResNet56_DoubleShared", [], "converts into ResNet32_DoubleShared"),
    ("ours.pth", "ResNet32_NonShared", [], "not a conversion target"),
    ("ours.pth", "ResNet32_DoubleShared", ["--shared_rank", "200"], "too large"),
    ("ours.pth", "ResNet32_SharedOnly", ["--unique_rank", "1"], "does not take unique_rank"),
    ("ours.pth", "ResNet34_SingleShared", [], "not cifar10"),
    ("ours.pth", "ResNet32_DoubleShared", ["--dataset", "cifar100"], "pass --dataset cifar10"),
    ("authors.pth", "ResNet34_SingleShared", [], "pass --dataset"),
    ("tv18.pth", "ResNet34_SingleShared", [], "keys do not map"),
    ("tv34.pth", "ResNet34_SingleShared", ["--dataset", "cifar100"], "not cifar100"),
    ("missing.pth", "ResNet32_DoubleShared", [], "does not exist"),
    ("ours.pth", "ResNet32_DoubleShared", ["--calibrate", "8", "--dataset_path", "nowhere"], "not found"),
]


@pytest.mark.parametrize("file, target, extra, needle", BAD)
def test_bad_input_is_one_line_and_writes_nothing(plain_files, tmp_path, capsys, file, target, extra, needle):
    root, _ = plain_files
    if file.startswith("tv"):
        state = torchvision_resnet("resnet18" if file == "tv18.pth" else "resnet34").state_dict()
        torch.save(state, root / file)
    out = tmp_path / "out.pth"
    assert main(["--from", str(root / file), "--model", target, *extra, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.slow
def test_converted_file_fine_tunes_and_evaluates_with_the_scripts(plain_files, tmp_path):
    """The issue's promise, end to end: convert (calibrated) -> train_cifar10.py --pretrained -> eval_cifar10.py."""
    import json
    import os
    import subprocess
    import sys

    from fakedata import write_fake_cifar

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}

    def run(*argv):
        done = subprocess.run([sys.executable, *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    write_fake_cifar(tmp_path / "data", "cifar10", n_train=32, n_test=32)
    data = str(tmp_path / "data")
    root, _ = plain_files
    out = tmp_path / "shared.pth"
    ranks = ["--shared_rank=2", "--unique_rank=1"]
    flags = ["--calibrate=16", f"--dataset_path={data}"]
    printed = run(
        "-m",
        "models.convert",
        f"--from={root / 'ours.pth'}",
        "--model=ResNet32_DoubleShared",
        *ranks,
        *flags,
        f"--out={out}",
    )
    assert "calibrated on 16 images" in printed
    common = [f"--dataset_path={data}", "--device=cpu", "--num_workers=0", "--batch_size=16"]
    run("eval_cifar10.py", f"--pretrained={out}", *common)  # ranks and model read from the file
    tuned = tmp_path / "tuned"
    trained = run(
        "train_cifar10.py",
        f"--pretrained={out}",
        "--model=ResNet32_DoubleShared",
        *ranks,
        "--epochs=1",
        "--lr=0.01",
        f"--output_dir={tuned}",
        *common,
    )
    assert f"Starting from {out}" in trained
    best = json.loads(trained.strip().splitlines()[-1])["best_checkpoint"]
    scored = json.loads(run("eval_cifar10.py", f"--pretrained={best}", *common).strip().splitlines()[-1])
    assert scored["model"] == "ResNet32_DoubleShared" and scored["model_kwargs"] == {"shared_rank": 2, "unique_rank": 1}
