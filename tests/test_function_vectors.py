"""Every model computes the authors' function: train-mode logits, eval-mode logits and shared-basis gradients.

Reference data: tests/data/function_vectors.json.gz, a copy of the authors' code's outputs for all 48 models (39 of
the first manifest, 8 of the later one and the NoECA variant), in float64, from weights that tests/data/VECTORS.md
defines from the manifest alone. The procedure is re-implemented here from that description, so that a model with the
right keys and shapes but a dropped residual, a rewired basis or a moved BatchNorm fails.
"""

import functools
import gzip
import json
import math
import zlib

import pytest
import torch
import torch.nn as nn
from reference import DATA

from models import get_model


@functools.cache
def _vectors() -> dict:
    with gzip.open(DATA / "function_vectors.json.gz", "rt") as f:
        return json.load(f)


@functools.cache
def _manifests() -> dict:
    entries = {}
    for name in ("reference_manifest.json.gz", "reference_manifest_v2.json.gz"):
        with gzip.open(DATA / name, "rt") as f:
            entries.update(json.load(f)["models"])
    return entries


def _ranks(key: str) -> dict:
    """The rank kwargs of a manifest key's last part: 's16u1' -> shared 16, unique 1; 's16' or 'u1' alone."""
    parts = key.split("/")
    if len(parts) < 3:
        return {}
    tag, ranks = parts[2], {}
    if tag.startswith("s"):
        digits = tag[1:].split("u")[0]
        ranks["shared_rank"] = int(digits)
        tag = tag[1 + len(digits) :]
    if tag.startswith("u"):
        ranks["unique_rank"] = int(tag[1:])
    return ranks


def _weights(entry: dict, seed: int) -> dict:
    """VECTORS.md's weights: one generator per canonical key, so every alias of a shared basis is the same tensor."""
    aliases = entry["state_dict_aliases"]
    state = {}
    layout = entry["state_dict"]  # [[key, shape], ...] in the first manifest, {key: shape} in the later one
    for key, shape in layout.items() if isinstance(layout, dict) else layout:
        canon = aliases.get(key, key)
        g = torch.Generator().manual_seed((zlib.crc32(canon.encode()) ^ seed) & 0x7FFFFFFF)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_mean"):
            state[key] = torch.zeros(shape)
        elif key.endswith("running_var"):
            state[key] = torch.ones(shape)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif key.endswith("weight"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def _close(actual: torch.Tensor, expected, what: str) -> None:
    expected = torch.tensor(expected, dtype=torch.float64)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7 * scale, msg=what)


def _check(key: str) -> None:
    entry, seed = _manifests()[key], _vectors()["seed"]
    expected = _vectors()["vectors"][key]
    dataset, name = key.split("/")[:2]
    model = get_model(name, dataset, **_ranks(key))
    model.load_state_dict(_weights(entry, seed), strict=True)
    model.double()

    g = torch.Generator().manual_seed(seed)
    _, c, h, w = entry["input_size"]
    x_cal = torch.randn(8, c, h, w, generator=g).double()
    x_test = torch.randn(2, c, h, w, generator=g).double()

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
        elif isinstance(m, nn.Dropout):
            m.eval()
    y = model(x_cal)
    _close(y[:2].detach(), expected["train_logits_first2"], f"{key}: train-mode logits")

    y.square().mean().backward()
    tensors = model.state_dict(keep_vars=True)
    grads = {k: tensors[k].grad for k in expected["shared_grad_norms"]}
    norms = {k: 0.0 if grad is None else grad.norm().item() for k, grad in grads.items()}  # None: a copy took it
    assert norms.keys() == set(entry["state_dict_aliases"].values())
    for k, norm in expected["shared_grad_norms"].items():
        assert norms[k] == pytest.approx(norm, rel=1e-7), f"{key}: gradient of {k}"

    model.eval()
    with torch.no_grad():
        _close(model(x_test), expected["eval_logits"], f"{key}: eval-mode logits")


# Float64 convolutions are slow on a CPU: the fast tier checks one model of each family and variant (the cheapest),
# the slow tier all 48.
_FAST = {
    "cifar10/ResNet20",
    "cifar10/ResNet32_DoubleShared/s8u1",
    "cifar10/ResNet32_SingleShared/s8u1",
    "cifar10/ResNet32_SharedOnly/s16",
    "cifar10/ResNet32_NonShared/u1",
    "cifar100/ResNet34_SingleShared/s8u1",
    "cifar100/DenseNet121_SingleShared/s16u1",
    "cifar100/ResNext50_SingleShared/s64u4",
    "cifar100/MobileNetV2_Shared",
    "cifar100/MobileNetV2_SharedDouble",
}
KEYS = [k if k in _FAST else pytest.param(k, marks=pytest.mark.slow) for k in sorted(_vectors()["vectors"])]


def test_every_reference_model_has_a_vector():
    assert set(_vectors()["vectors"]) == set(_manifests()) and len(KEYS) == 48


@pytest.mark.parametrize("key", KEYS)
def test_model_computes_the_authors_function(key, one_thread):
    _check(key)
