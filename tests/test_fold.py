"""models.fold: eval-mode folding of every family (CPU, about 30 s).

Each model is trained a few SGD steps first (random BN affine, then batch statistics from training), so that folding
meets non-trivial weights and running statistics; the trained model is built once per case and shared by the tests,
which must not modify it.
"""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import fold, get_model
from models.densenet import DenseLayer as DenseBottleneck
from models.densenet import FoldedSharedDenseLayer as DenseFoldedShared
from models.resnext import FoldedSharedResNeXtBlock as ResNeXtFoldedShared
from models.summary import count_macs, count_params

# id: (model, dataset, ranks, input size, plain model whose state_dict layout the folded one must have, or None)
CASES = {
    "cifar10/ResNet56_DoubleShared": (
        "ResNet56_DoubleShared",
        "cifar10",
        dict(shared_rank=16, unique_rank=1),
        32,
        "ResNet56",
    ),
    "cifar100/ResNet34_SingleShared/s4u1@16": (
        "ResNet34_SingleShared",
        "cifar100",
        dict(shared_rank=4, unique_rank=1),
        16,
        None,
    ),
    # Low ranks against the width keep a basis conv + 1x1 conv per position (dense_is_cheaper is False).
    "ilsvrc/ResNet34_DoubleShared@64": (
        "ResNet34_DoubleShared",
        "ilsvrc",
        dict(shared_rank=32, unique_rank=1),
        64,
        None,
    ),
    # S16U1 (r = 17) keeps the factorisation, S64U4 (r = 68) becomes the plain DenseNet (dense_is_cheaper).
    "cifar100/DenseNet121_SingleShared/s16u1@16": (
        "DenseNet121_SingleShared",
        "cifar100",
        dict(shared_rank=16, unique_rank=1),
        16,
        None,
    ),
    "cifar100/DenseNet121_SingleShared/s64u4@16": (
        "DenseNet121_SingleShared",
        "cifar100",
        dict(shared_rank=64, unique_rank=4),
        16,
        "DenseNet121",
    ),
    "cifar100/ResNext50_SingleShared/s64u4": (
        "ResNext50_SingleShared",
        "cifar100",
        dict(shared_rank=64, unique_rank=4),
        32,
        None,
    ),
    "cifar100/MobileNetV2_Shared": ("MobileNetV2_Shared", "cifar100", {}, 32, None),
    "ilsvrc/MobileNetV2_Shared@64": ("MobileNetV2_Shared", "ilsvrc", {}, 64, None),
}
IDS = [pytest.param(c, marks=pytest.mark.slow) if c.startswith("cifar100/ResNext50") else c for c in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def trained(case: str) -> nn.Module:
    """The case's model after 3 SGD steps in train mode, returned in eval mode."""
    name, dataset, ranks, size, _ = CASES[case]
    torch.manual_seed(0)
    model = get_model(name, dataset, **ranks)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:  # BN affine off its (1, 0) init, so scales and shifts all matter
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # running stats = average of the batches seen: fully "trained" after a few steps
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x = torch.randn(4, 3, size, size)
        y = torch.randint(0, model.cfg.num_classes, (4,))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _input(case: str, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, CASES[case][3], CASES[case][3], generator=torch.Generator().manual_seed(7))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _layout(model: nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("case", IDS)
def test_fold_matches_unfolded_eval(case):
    model = trained(case)
    folded = fold(model)
    assert not folded.training and folded.folded is True
    x = _input(case)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert ref.abs().max() > 1e-3  # not a degenerate comparison
    assert _rel_err(out, ref) < 1e-4
    # The network-level bases are gone (DenseNet's never-called shared_basis_4 too), and nothing still calls them.
    assert not any("shared_basis" in k for k in folded.state_dict())
    assert not any(type(m).__name__.startswith("Shared") for m in folded.modules())
    plain_name = CASES[case][4]
    if plain_name is not None:  # the folded model *is* the plain one: same layout, loadable, same outputs
        plain = get_model(plain_name, CASES[case][1]).eval()
        assert _layout(folded) == _layout(plain)
        plain.load_state_dict(folded.state_dict())
        with torch.no_grad():
            assert _rel_err(plain(x), ref) < 1e-4


def test_folded_structure_per_family():
    dense = fold(trained("cifar100/DenseNet121_SingleShared/s16u1@16"))
    layers = [m for m in dense.modules() if isinstance(m, (DenseBottleneck, DenseFoldedShared))]
    assert len(layers) == 58 and all(isinstance(m, DenseFoldedShared) for m in layers)
    assert all(m.coeff_conv2.bias is None and m.basis_conv2.weight.shape == (17, 128, 3, 3) for m in layers)
    assert not any(isinstance(m, nn.BatchNorm2d) and m.num_features == 17 for m in dense.modules())

    resnext = fold(trained("cifar100/ResNext50_SingleShared/s64u4"))
    blocks = [b for g in (1, 2, 3, 4) for b in getattr(resnext, f"layer{g}")[1:]]
    assert len(blocks) == 12 and all(isinstance(b, ResNeXtFoldedShared) for b in blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for b in blocks for m in b.modules())  # bn1, bn2 and bn3 folded
    block = resnext.layer2[1]
    assert (block.basis_conv2.groups, block.shared_conv2.groups) == (2, 16)  # grouped bases stay grouped
    assert block.shared_conv2.weight.shape == (128, 16, 3, 3) and block.basis_conv2.bias is not None

    for case in ("cifar100/MobileNetV2_Shared", "ilsvrc/MobileNetV2_Shared@64"):
        model = trained(case)
        mobile = fold(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in mobile.modules())
        # Each block that called stage 3's shared expansion now has its own (different) 1x1 conv with a bias.
        shared = model.shared_basis_1.weight
        convs = [b.conv1 for b in mobile.stage3[1:]]
        assert all(c.weight.shape == shared.shape and c.bias is not None for c in convs)
        assert not torch.equal(convs[0].weight, convs[1].weight)


@pytest.mark.parametrize("case", IDS)
def test_fold_does_not_add_macs(case):
    model = trained(case)
    size = (3, CASES[case][3], CASES[case][3])
    assert count_macs(fold(model), size) <= count_macs(model, size)


def test_fold_refuses_train_mode():
    model = get_model("ResNet20", "cifar10")
    assert model.training
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fold(model)


@pytest.mark.parametrize(
    "case",
    [
        "cifar10/ResNet56_DoubleShared",
        "cifar100/DenseNet121_SingleShared/s16u1@16",
        "cifar100/ResNext50_SingleShared/s64u4",
        "cifar100/MobileNetV2_Shared",
    ],
)
def test_fold_does_not_modify_input(case):
    model = trained(case)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    params = count_params(model)
    rng = torch.get_rng_state()
    folded = fold(model)
    assert torch.equal(torch.get_rng_state(), rng)  # building the folded modules does not consume the global RNG
    assert not model.training and not hasattr(model, "folded")
    assert [(n, type(m)) for n, m in model.named_modules()] == modules and count_params(model) == params
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p.data_ptr() != q.data_ptr() for p in folded.parameters() for q in model.parameters())


def test_fold_twice_is_a_copy():
    model = trained("cifar100/MobileNetV2_Shared")
    once = fold(model)
    twice = fold(once)
    assert twice is not once and _layout(twice) == _layout(once)
    x = _input("cifar100/MobileNetV2_Shared")
    with torch.no_grad():
        assert torch.equal(twice(x), once(x))


def test_fold_keeps_bases_of_modules_that_still_use_them():
    """Modules without folded() keep working: their shared basis is not dropped from the copy."""
    from models import SharedBasisConv2d
    from models.basis import make_shared_basis

    basis = make_shared_basis(8, 4)
    net = nn.Sequential(SharedBasisConv2d(8, 8, 1, basis), SharedBasisConv2d(8, 8, 1, basis)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fold(net)(x), net(x))
        torch.testing.assert_close(fold(net[0])(x), net[0](x))
