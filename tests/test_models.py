"""Every reference model: state_dict layout, parameter count and FLOPs against the authors' code (models.json)."""

import pytest
import torch
from reference import entries, entry_args

from models import get_model, list_models
from models.pretrained import build_model
from models.summary import count_macs, count_params, paper_table

ENTRIES = entries()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["key"] for e in ENTRIES])
def test_matches_reference(entry):
    dataset, name, ranks = entry_args(entry)
    model = get_model(name, dataset, **ranks)
    state = model.state_dict(keep_vars=True)
    assert [[k, list(v.shape)] for k, v in state.items()] == entry["state_dict"]
    for alias, target in entry["state_dict_aliases"].items():
        assert state[alias] is state[target], alias  # one shared tensor, listed under every alias
    assert count_params(model) == entry["params"]
    assert count_macs(model) == entry["macs_ptflops_0_6_2"]


def test_paper_rows_reproduced():
    rows = paper_table()
    assert len(rows) == 15
    assert all(r["flops_ok"] for r in rows), [r["row"] for r in rows if not r["flops_ok"]]
    wrong_in_paper = {("cifar10", "ResNet32-S16U1*"), ("cifar10", "ResNet56-S16U1"), ("cifar10", "ResNet56-S16U1*")}
    assert {(r["dataset"], r["row"]) for r in rows if not r["params_ok"]} == wrong_in_paper


SCRIPT_NAMES = {
    "cifar10": [
        "ResNet20",
        "ResNet32",
        "ResNet44",
        "ResNet56",
        "ResNet110",
        "ResNet1202",
        "ResNet56_DoubleShared",
        "ResNet32_DoubleShared",
        "ResNet56_SingleShared",
        "ResNet32_SingleShared",
        "ResNet56_SharedOnly",
        "ResNet32_SharedOnly",
        "ResNet56_NonShared",
        "ResNet32_NonShared",
    ],
    "cifar100": [
        "ResNet18",
        "ResNet34",
        "ResNet34_SingleShared",
        "ResNet34_NonShared",
        "ResNet34_SharedOnly",
        "DenseNet121",
        "DenseNet121_SingleShared",
        "ResNext50",
        "ResNext50_SingleShared",
        "MobileNetV2",
        "MobileNetV2_Shared",
        "MobileNetV2_SharedDouble",
    ],
    "ilsvrc": [
        "ResNet18",
        "ResNet34",
        "ResNet34_DoubleShared",
        "ResNet34_SingleShared",
        "MobileNetV2",
        "MobileNetV2_Shared",
        "ResNet50",
        "ResNet101",
        "ResNet50_SharedSingle",
        "ResNet50_Shared",
        "ResNet101_SharedSingle",
        "ResNet101_Shared",
        "MobileNetV2_SharedDouble",
        "MobileNetV2_SharedDouble_NoECA",
    ],  # the authors' later names (SPEC_v2 section 1), one older layout
}


@pytest.mark.parametrize("dataset", SCRIPT_NAMES)
def test_registry_has_every_script_name(dataset):
    assert sorted(list_models(dataset)) == sorted(SCRIPT_NAMES[dataset])


# ResNet1202 and the ResNet101s are too big for this tier (test_models_v2.py runs ResNet101_Shared, marked slow)
ALL = [(d, n) for d in SCRIPT_NAMES for n in SCRIPT_NAMES[d] if n != "ResNet1202" and not n.startswith("ResNet101")]


@pytest.mark.parametrize("dataset,name", ALL, ids=[f"{d}/{n}" for d, n in ALL])
def test_forward_backward(dataset, name):
    torch.manual_seed(0)
    model = get_model(name, dataset)
    size = model.cfg.input_size if dataset != "ilsvrc" else (3, 64, 64)  # ImageNet nets are size-agnostic
    out = model(torch.randn(2, *size))
    assert out.shape == (2, model.cfg.num_classes) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    unused = {"shared_basis_4.weight"} if name == "DenseNet121_SingleShared" else set()  # SPEC 2.4: never called
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not missing


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: .*ResNet56_DoubleShared"):
        get_model("ResNet57", "cifar10")
    with pytest.raises(ValueError, match="valid datasets"):
        get_model("ResNet56", "mnist")
    with pytest.raises(ValueError, match="does not take shared_rank; it takes no rank arguments"):
        get_model("ResNet56", "cifar10", shared_rank=16)
    with pytest.raises(ValueError, match="does not take unique_rank; it takes shared_rank"):
        get_model("ResNet56_SharedOnly", "cifar10", unique_rank=1)
    with pytest.raises(ValueError, match="positive integer"):
        get_model("ResNet56_DoubleShared", "cifar10", shared_rank=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        get_model("ResNext50_SingleShared", "cifar100", shared_rank=16, unique_rank=1)


def test_cfg_records_build():
    model = get_model("ResNet56_DoubleShared", dataset="cifar10", shared_rank=16, unique_rank=1)
    assert model.cfg.build_kwargs() == {"shared_rank": 16, "unique_rank": 1}
    assert model.cfg.num_classes == 10 and model.cfg.input_size == (3, 32, 32)
    assert get_model("ResNet34_DoubleShared", "ilsvrc").cfg.build_kwargs() == {"shared_rank": 32, "unique_rank": 1}


def test_rank_bound_refuses_before_allocating():
    """A huge rank is refused by the registry with the bound, not by the allocator (9 x the group-1 width: a 3x3
    basis over 16 channels is full rank at 144 filters)."""
    with pytest.raises(ValueError, match=r"shared_rank=100000 is too large for ResNet32_DoubleShared \(at most 144"):
        get_model("ResNet32_DoubleShared", "cifar10", shared_rank=100000)
    with pytest.raises(ValueError, match=r"unique_rank=145 is too large for ResNet32_NonShared \(at most 144"):
        get_model("ResNet32_NonShared", "cifar10", unique_rank=145)
    assert get_model("ResNet32_NonShared", "cifar10", unique_rank=144).cfg.unique_rank == 144
    with pytest.raises(ValueError, match=r"too large for DenseNet121_SingleShared \(at most 1152"):
        get_model("DenseNet121_SingleShared", "cifar100", shared_rank=100000)
    with pytest.raises(ValueError, match=r"too large for ResNext50_SingleShared \(at most 1152"):
        get_model("ResNext50_SingleShared", "cifar100", shared_rank=100000)


def test_ignore_unused_ranks_drops_only_what_the_model_does_not_take():
    with pytest.raises(ValueError, match="does not take unique_rank"):
        get_model("ResNet56_SharedOnly", "cifar10", shared_rank=8, unique_rank=1)
    model = get_model("ResNet56_SharedOnly", "cifar10", shared_rank=8, unique_rank=1, ignore_unused_ranks=True)
    assert model.cfg.build_kwargs() == {"shared_rank": 8}
    plain = get_model("ResNet20", "cifar10", shared_rank=16, unique_rank=1, ignore_unused_ranks=True)
    assert plain.cfg.build_kwargs() == {} and not any("basis" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="positive integer"):  # the ranks it takes are still checked
        get_model("ResNet56_SharedOnly", "cifar10", shared_rank=0, unique_rank=1, ignore_unused_ranks=True)


def test_ranks_that_cannot_build_name_the_papers_ranks():
    with pytest.raises(
        ValueError,
        match=r"multiple of 4 .*the paper's ResNext50_SingleShared was trained with "
        r"--shared_rank=64 --unique_rank=4",
    ):
        get_model("ResNext50_SingleShared", "cifar100", shared_rank=16, unique_rank=1, ignore_unused_ranks=True)


def test_variant_suffix_decides_the_rank_arguments():
    from models.registry import model_defaults, model_rank_args, register_model

    assert model_rank_args("ResNet32_NonShared", "cifar10") == ("unique_rank",)
    assert model_rank_args("MobileNetV2_Shared", "ilsvrc") == ()
    assert model_defaults("ResNet34_DoubleShared", "ilsvrc") == {"shared_rank": 32, "unique_rank": 1}
    with pytest.raises(ValueError, match="unknown variant 'TripleShared'"):
        register_model("cifar10", "ResNet32_TripleShared", channels=16)


@pytest.mark.slow
def test_models_package_imports_nothing_from_utils():
    """models/ and hubconf.py stand alone: the training layer (utils) is never imported by them."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; import models, models.export, models.pretrained, models.summary, hubconf; "
        "bad = sorted(m for m in sys.modules if m == 'utils' or m.startswith('utils.')); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_authors_hyphen_spelling_and_closest_name():
    """The authors' README writes ``--model=ResNet56-DoubleShared``; a misspelt name is answered with the closest."""
    model = get_model("ResNet56-DoubleShared", "cifar10")
    assert model.cfg.name == "ResNet56_DoubleShared"
    with pytest.raises(ValueError, match="did you mean ResNet56_DoubleShared\\?"):
        get_model("ResNet56_DoubleShard", "cifar10")
    with pytest.raises(ValueError, match="did you mean ResNet34_SingleShared\\?"):
        build_model("ResNet34_SingleShard")
