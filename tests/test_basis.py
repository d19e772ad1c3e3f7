"""SharedBasisConv2d and the shared blocks: fused == two-conv form, sharing is one tensor, init, BN settings."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import SharedBasisConv2d, basis_conv2d, get_model, set_fused
from models.basis import basis_groups, make_shared_basis
from models.resnet import SharedBasicBlock


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("unique_rank,shared_rank", [(1, 16), (4, 8), (0, 8), (3, 0)])
def test_fused_equals_two_convs_outputs_and_gradients(unique_rank, shared_rank):
    torch.manual_seed(0)
    shared = make_shared_basis(16, shared_rank) if shared_rank else None
    conv = SharedBasisConv2d(16, 32, unique_rank, shared)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    results = []
    for fused in (True, False):
        conv.fused = fused
        conv.zero_grad()
        x.grad = None
        y = conv(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad.clone(), _grads(conv.parameters())))
    (y1, gx1, g1), (y2, gx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_model_equals_two_conv_model():
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=8, unique_rank=1)
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        y = model(x)
        y.logsumexp(1).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_basis_conv_equals_dense_conv_built_from_parts():
    """Slow reference: in eval mode, coeff x BN x [unique || shared] is one dense 3x3 conv with bias."""
    torch.manual_seed(0)
    conv = SharedBasisConv2d(8, 12, 2, make_shared_basis(8, 6)).eval()
    bn = conv.basis_bn
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    basis = torch.cat([conv.basis_conv.weight, conv.shared_basis.weight])  # (r, 8, 3, 3)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    coeff = conv.coeff_conv.weight.flatten(1)  # (12, r)
    dense = torch.einsum("or,rikl->oikl", coeff * scale, basis)
    bias = coeff @ (bn.bias - bn.running_mean * scale)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, dense, bias, padding=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,dataset,bases",
    [
        ("ResNet56_DoubleShared", "cifar10", 2),
        ("ResNet56_SingleShared", "cifar10", 1),
        ("ResNet56_SharedOnly", "cifar10", 2),
        ("ResNet34_SharedOnly", "cifar100", 1),
        ("ResNet34_DoubleShared", "ilsvrc", 2),
    ],
)
def test_each_block_uses_the_groups_bases(name, dataset, bases):
    model = get_model(name, dataset, shared_rank=4)
    groups = basis_groups(model)
    assert len(groups) == model.num_groups
    for g, group in enumerate(groups, 1):
        keys = [f"shared_basis_{g}"] if bases == 1 else [f"shared_basis_{g}_{j}" for j in range(1, bases + 1)]
        assert [w is getattr(model, key).weight for w, key in zip(group.shared, keys)] == [True] * bases
        blocks = list(getattr(model, f"layer{g}"))
        assert not isinstance(blocks[0], SharedBasicBlock)  # first block of every group is plain
        expected = group.shared if bases == 2 else group.shared * 2
        for block in blocks[1:]:
            assert [p.shared.weight for p in block.basis_positions()] == expected  # the same tensors
            assert all(p.shared.weight is expected[i] for i, p in enumerate(block.basis_positions()))


def test_non_shared_blocks_own_distinct_weights():
    model = get_model("ResNet32_NonShared", "cifar10", unique_rank=2)
    weights = [p.unique.weight for m in model.modules() if isinstance(m, SharedBasicBlock) for p in m.basis_positions()]
    assert all(
        p.shared is None for m in model.modules() if isinstance(m, SharedBasicBlock) for p in m.basis_positions()
    )
    assert len({id(w) for w in weights}) == len(weights) == 2 * 3 * 4
    assert basis_groups(model) == []  # unique filters only: nothing to regularise


def test_shared_basis_gets_gradient_from_every_block(one_thread):
    """The network's loss reaches a group's basis through every use: its gradient is the sum of the gradients that
    private copies, one per block and position, receive from the same loss (each of them non-zero)."""
    torch.manual_seed(0)
    model = get_model("ResNet32_DoubleShared", "cifar10", shared_rank=4, unique_rank=1).train()
    untied = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    copies = {"shared_basis_1": [], "shared_basis_2": []}
    for block in list(untied.layer2)[1:]:
        for key in copies:
            private = copy.deepcopy(getattr(block, key))
            setattr(block, key, private)
            copies[key].append(private.weight)
    F.cross_entropy(untied(x), y).backward()
    for key, tied in (("shared_basis_1", model.shared_basis_2_1), ("shared_basis_2", model.shared_basis_2_2)):
        assert len(copies[key]) == 4 and all(w.grad is not None and w.grad.abs().sum() > 0 for w in copies[key])
        torch.testing.assert_close(tied.weight.grad, sum(w.grad for w in copies[key]), rtol=1e-4, atol=1e-6)


def test_sharing_survives_load_state_dict_and_to():
    src = get_model("ResNet32_SingleShared", "cifar10", shared_rank=4, unique_rank=1)
    dst = get_model("ResNet32_SingleShared", "cifar10", shared_rank=4, unique_rank=1)
    dst.load_state_dict(src.state_dict())
    dst.to(torch.float64)
    for block in list(dst.layer1)[1:]:
        assert block.shared_basis.weight is dst.shared_basis_1.weight
    torch.testing.assert_close(dst.shared_basis_1.weight.float(), src.shared_basis_1.weight)
    assert sum(1 for _ in dst.parameters()) == len({id(p) for p in dst.parameters()})


@pytest.mark.parametrize(
    "name,dataset",
    [
        ("ResNet56_DoubleShared", "cifar10"),
        ("ResNet56_SharedOnly", "cifar10"),
        ("ResNet32_SingleShared", "cifar10"),
        ("ResNet34_SingleShared", "cifar100"),
        ("ResNet34_DoubleShared", "ilsvrc"),
    ],
)
def test_initial_shared_bases_are_orthonormal(name, dataset):
    model = get_model(name, dataset)
    for group in basis_groups(model):
        rows = torch.cat([w.flatten(1) for w in group.shared])  # a pair is orthonormal jointly
        torch.testing.assert_close(rows @ rows.t(), torch.eye(rows.shape[0]), atol=1e-5, rtol=0)


def test_initialisation_follows_the_reference():
    model = get_model("ResNet56_DoubleShared", "cifar10")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-5 and m.momentum == 0.1 and m.affine and m.track_running_stats
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.layer3[0].conv1  # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005


def test_manual_seed_controls_everything():
    torch.manual_seed(3)
    a = get_model("ResNet32_DoubleShared", "cifar10").state_dict()
    torch.manual_seed(3)
    b = get_model("ResNet32_DoubleShared", "cifar10").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_basis_conv2d_rejects_nothing_silently():
    with pytest.raises(ValueError):
        SharedBasisConv2d(8, 8, 0, None)
    with pytest.raises(ValueError, match="input channels"):
        SharedBasisConv2d(8, 8, 1, make_shared_basis(4, 2))
    x = torch.randn(1, 8, 6, 6)
    shared, unique = make_shared_basis(8, 3), nn.Conv2d(8, 2, 3, stride=2, padding=1, bias=False)
    y_fused = basis_conv2d(x, unique, shared, stride=2)
    y_split = basis_conv2d(x, unique, shared, stride=2, fused=False)
    assert y_fused.shape == (1, 5, 3, 3)
    torch.testing.assert_close(y_fused, y_split)
