"""The orthogonality regulariser: batched form == the authors' straightforward form, values and gradients."""

import pytest
import torch

from models import OrthogonalityRegularizer, basis_groups, get_model
from models.regularizer import orthogonality_penalty_reference

CASES = [
    ("ResNet32_DoubleShared", "cifar10", True),
    ("ResNet32_SingleShared", "cifar10", True),
    ("ResNet32_SharedOnly", "cifar10", True),
    ("ResNet32_DoubleShared", "cifar10", False),
    ("ResNet34_SingleShared", "cifar100", False),
    ("ResNet34_SharedOnly", "cifar100", False),
    ("ResNet34_DoubleShared", "ilsvrc", False),
    ("ResNet34_SingleShared", "ilsvrc", False),
]


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name,dataset,include_unique", CASES)
def test_batched_equals_reference(name, dataset, include_unique):
    model = get_model(name, dataset, shared_rank=4)
    _perturb(model)
    fast = OrthogonalityRegularizer(model, include_unique)()
    (g_fast,) = [torch.autograd.grad(fast, [p for p in model.parameters()], allow_unused=True)]
    slow = orthogonality_penalty_reference(model, include_unique)
    (g_slow,) = [torch.autograd.grad(slow, [p for p in model.parameters()], allow_unused=True)]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_fast, g_slow):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_formula_by_hand_for_one_group():
    """SPEC section 4, CIFAR-10 form, written out entry by entry for a tiny model."""
    model = get_model("ResNet20", "cifar10")  # plain: nothing to regularise
    assert not OrthogonalityRegularizer(model, True)
    model = get_model("ResNet32_SingleShared", "cifar10", shared_rank=2, unique_rank=1)
    _perturb(model)
    total, count = 0.0, 0
    for group in basis_groups(model):
        rows = [r for w in group.shared for r in w.flatten(1)] + [r for w in group.unique for r in w.flatten(1)]
        n_shared = sum(w.shape[0] for w in group.shared)
        owner = [None] * n_shared + [i for i, w in enumerate(group.unique) for _ in range(w.shape[0])]
        for i in range(len(rows)):
            for j in range(len(rows)):
                if i < n_shared or (owner[i] is not None and owner[i] == owner[j]):
                    total += ((rows[i] @ rows[j]).item() - (i == j)) ** 2
                    count += 1
    value = OrthogonalityRegularizer(model, True)().item()
    assert abs(value - total / count) < 1e-5 * max(1.0, abs(value))


def test_zero_at_orthonormal_init_and_gradients_only_to_bases():
    model = get_model("ResNet56_DoubleShared", "cifar10")
    reg = OrthogonalityRegularizer(model, include_unique=False)
    assert reg().item() < 1e-10
    model2 = get_model("ResNet56_DoubleShared", "cifar10")
    r = OrthogonalityRegularizer(model2, include_unique=True)()
    r.backward()
    for name, p in model2.named_parameters():
        is_basis = "shared_basis" in name or "basis_conv" in name
        assert (p.grad is not None) == is_basis, name


def test_no_regulariser_for_non_shared():
    assert not OrthogonalityRegularizer(get_model("ResNet56_NonShared", "cifar10"), True)
    assert not OrthogonalityRegularizer(get_model("ResNet34", "cifar100"), False)


def test_folded_models_are_refused_clearly():
    from models import fold

    folded = fold(get_model("DenseNet121_SingleShared", "cifar100").eval())
    with pytest.raises(ValueError, match="folded for inference"):
        OrthogonalityRegularizer(folded, include_unique=False)


@pytest.mark.parametrize(
    "name,dataset,unique",
    [
        ("ResNet32_DoubleShared", "cifar10", True),
        ("ResNet34_SingleShared", "cifar100", False),
        ("ResNet34_DoubleShared", "ilsvrc", False),
    ],
)
def test_default_form_is_the_authors_script_for_the_dataset(name, dataset, unique):
    """include_unique=None (the default) is the form of the authors' training script: CIFAR-10 includes the unique
    filters, CIFAR-100 and ILSVRC do not."""
    from models.regularizer import includes_unique, orthogonality_penalty

    model = get_model(name, dataset, shared_rank=2)
    _perturb(model)
    assert includes_unique(dataset) is unique
    reg = OrthogonalityRegularizer(model)
    assert reg.include_unique is unique
    assert torch.equal(reg(), OrthogonalityRegularizer(model, include_unique=unique)())
    assert not torch.equal(reg(), OrthogonalityRegularizer(model, include_unique=not unique)())
    assert torch.equal(orthogonality_penalty(model), reg())
    torch.testing.assert_close(orthogonality_penalty_reference(model), reg(), rtol=1e-5, atol=1e-7)


def test_default_form_needs_a_dataset():
    from models import SharedBasisConv2d
    from models.basis import make_shared_basis

    layer = SharedBasisConv2d(4, 8, 1, make_shared_basis(4, 2))  # no cfg: no dataset to take the form from
    assert [len(g.unique) for g in basis_groups(layer)] == [1]
    with pytest.raises(ValueError, match="pass include_unique=True/False"):
        OrthogonalityRegularizer(layer)
    # SPEC section 4 by hand: rows s1 = 2 e1, s2 = e2 (shared), u = e1 + e2 (unique). D = (B B^T - I)^2 has
    # D11 = 9, D12 = 0, D13 = 4, D22 = 0, D23 = 1, D33 = 1; the selection is the 2 shared rows (2 x 3 entries) plus the
    # unique conv's own 1 x 1 block: R = (9 + 0 + 4 + 0 + 0 + 1 + 1) / 7.
    e1, e2 = torch.zeros(36), torch.zeros(36)
    e1[0], e2[1] = 1.0, 1.0
    with torch.no_grad():
        layer.shared_basis.weight.copy_(torch.stack([2 * e1, e2]).view(2, 4, 3, 3))
        layer.basis_conv.weight.copy_((e1 + e2).view(1, 4, 3, 3))
    torch.testing.assert_close(OrthogonalityRegularizer(layer, include_unique=True)(), torch.tensor(15 / 7))
    # the shared-only form: the 2 x 2 shared block alone, (9 + 0 + 0 + 0) / 4
    torch.testing.assert_close(OrthogonalityRegularizer(layer, include_unique=False)(), torch.tensor(9 / 4))
