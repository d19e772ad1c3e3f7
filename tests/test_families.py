"""DenseNet121, ResNeXt50 and MobileNetV2 (CIFAR-100 and ILSVRC) against the authors' code (SPEC 2.4-2.6, 4, 8).

Reference data: tests/data/reference_manifest.json.gz (via tests/reference.py).
"""

import pytest
import torch
from reference import entry_args, manifest

from models import BasisCfg, basis_groups, get_model, set_fused
from models.densenet import DenseNet, SharedDenseLayer
from models.regularizer import OrthogonalityRegularizer
from models.resnext import ResNeXt
from models.summary import count_macs

KEYS = [
    "cifar100/DenseNet121",
    "cifar100/DenseNet121_SingleShared/s16u1",
    "cifar100/DenseNet121_SingleShared/s64u4",
    "cifar100/ResNext50",
    "cifar100/ResNext50_SingleShared/s64u4",
    "cifar100/MobileNetV2",
    "cifar100/MobileNetV2_Shared",
    "ilsvrc/MobileNetV2",
    "ilsvrc/MobileNetV2_Shared",
]
SHARED_KEYS = [k for k in KEYS if "Shared" in k]


def _entry(key: str) -> dict:
    return dict(manifest()["models"][key], key=key)


def _build(key: str, seed: int = 0):
    dataset, name, ranks = entry_args(_entry(key))
    torch.manual_seed(seed)
    return get_model(name, dataset, **ranks)


def _unused(key: str) -> set:
    # SPEC 2.4: DenseNet's last dense block is wired to shared_basis_3, so shared_basis_4 is never called.
    return {"shared_basis_4.weight"} if "DenseNet121_SingleShared" in key else set()


@pytest.mark.parametrize("key", KEYS)
def test_model(key):
    """state_dict keys/shapes/order, alias identity, params, MACs; then forward and backward (one build)."""
    entry, model = _entry(key), _build(key)
    state = model.state_dict(keep_vars=True)
    assert [[k, list(v.shape)] for k, v in state.items()] == entry["state_dict"]
    for alias, target in entry["state_dict_aliases"].items():
        assert state[alias] is state[target], alias
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    assert count_macs(model) == entry["macs_ptflops_0_6_2"]  # ptflops 0.6 convention (SPEC 8)

    size = model.cfg.input_size
    if key == "ilsvrc/MobileNetV2_Shared":
        size = (3, 64, 64)  # one 224 check (plain MobileNetV2) is enough; the net is size-agnostic
    out = model(torch.randn(2, *size))
    assert out.shape == (2, model.cfg.num_classes) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == _unused(key)


def test_densenet_unused_basis_is_regularised():
    model = _build("cifar100/DenseNet121_SingleShared/s16u1")
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # the net is size-agnostic; 16x16 keeps this cheap
    assert model.shared_basis_4.weight.grad is None  # never called in forward
    groups = basis_groups(model)
    assert [g.shared[0] is getattr(model, f"shared_basis_{i}").weight for i, g in enumerate(groups, 1)] == [True] * 4
    # Block 4 uses basis 3: group 3 holds the unique bases of dense blocks 3 and 4, group 4 none.
    assert [len(g.unique) for g in groups] == [6, 12, 24 + 16, 0]
    model.zero_grad(set_to_none=True)
    OrthogonalityRegularizer(model, include_unique=False)().backward()
    assert model.shared_basis_4.weight.grad is not None and model.shared_basis_4.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "shared_basis" not in n)


def _penalty_by_formula(model) -> torch.Tensor:
    """SPEC 4, shared-only form, written out: stack each shared basis's filters as rows (flattened over in*kh*kw),
    D_g = (B B^T - I)^2, R = sum over groups of sum(D_g) / sum over groups of n_g^2. Bases found by their keys."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for g in (1, 2, 3, 4):
        b = model.state_dict()[f"shared_basis_{g}.weight"].double()
        b = b.reshape(b.shape[0], -1)
        d = (b @ b.t() - torch.eye(b.shape[0], dtype=torch.float64)) ** 2
        total, count = total + d.sum(), count + d.numel()
    return total / count


@pytest.mark.parametrize("key", SHARED_KEYS)
def test_regulariser_matches_formula(key):
    model = _build(key)
    with torch.no_grad():  # move the bases off their init (ResNeXt's are orthonormal, R ~ 0) to a generic point
        gen = torch.Generator().manual_seed(1)
        for g in (1, 2, 3, 4):
            w = getattr(model, f"shared_basis_{g}").weight
            w.mul_(1.5).add_(0.05 * torch.randn(w.shape, generator=gen))
    value = OrthogonalityRegularizer(model, include_unique=False)()
    expected = _penalty_by_formula(model)
    assert expected > 1e-3
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)


def test_resnext_bases_start_orthonormal_and_grouped():
    model = _build("cifar100/ResNext50_SingleShared/s64u4")
    assert _penalty_by_formula(model) < 1e-10  # SPEC 3: defaults, then each shared basis orthogonal
    assert [getattr(model, f"shared_basis_{g}").groups for g in (1, 2, 3, 4)] == [16] * 4  # s/4 in every layer
    assert [model.get_submodule(f"layer{g}.1").basis_conv2.groups for g in (1, 2, 3, 4)] == [1, 2, 4, 8]  # u*k/4
    assert not hasattr(model.layer1[1], "basis_positions")  # ReLU between basis BN and conv3: not foldable
    groups = basis_groups(model)
    assert [len(g.unique) for g in groups] == [2, 3, 5, 2]


def test_densenet_fused_equals_unfused():
    model = _build("cifar100/DenseNet121_SingleShared/s64u4").eval()
    layers = [m for m in model.modules() if isinstance(m, SharedDenseLayer)]
    assert len(layers) == 58 and all(len(m.basis_positions()) == 1 for m in layers)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
        unfused = set_fused(model, False)(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_registry_defaults():
    plain = get_model("ResNext50", "cifar100")  # the authors' scripts cannot build this one (SPEC 6)
    assert plain.linear.out_features == 100 and not basis_groups(plain)
    shared = get_model("ResNext50_SingleShared", "cifar100")
    assert (shared.cfg.shared_rank, shared.cfg.unique_rank) == (64, 4)
    dense = get_model("DenseNet121_SingleShared", "cifar100")
    assert (dense.cfg.shared_rank, dense.cfg.unique_rank) == (16, 1)
    assert get_model("MobileNetV2_Shared", "ilsvrc").classifier[1].out_features == 1000


@pytest.mark.parametrize("ranks", [dict(shared_rank=16, unique_rank=1), dict(shared_rank=6, unique_rank=4)])
def test_resnext_bad_ranks(ranks):
    with pytest.raises(ValueError, match="multiple of 4"):
        get_model("ResNext50_SingleShared", "cifar100", **ranks)


def test_resnext_ranks_that_cannot_divide_width():
    # Multiples of 4, but 12/4 = 3 groups cannot split the 128 input channels of layer 1.
    with pytest.raises(ValueError, match="multiple of 4 whose group count divides"):
        get_model("ResNext50_SingleShared", "cifar100", shared_rank=12, unique_rank=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        ResNeXt((3, 4, 6, 3), 100, basis=BasisCfg(1, 64, 2))


def test_densenet_plain_has_no_bases():
    model = DenseNet((6, 12, 24, 16), 100)
    assert basis_groups(model) == [] and not any("shared_basis" in n for n, _ in model.named_parameters())
