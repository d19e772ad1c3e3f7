"""Access to the reference facts copied from the authors' code (tests/data), for the tests."""

import functools
import gzip
import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


@functools.cache
def manifest() -> dict:
    with gzip.open(DATA / "reference_manifest.json.gz", "rt") as f:
        return json.load(f)


def entry_args(entry: dict) -> tuple:
    """(dataset, model name, rank kwargs) that build a manifest entry through the registry."""
    ranks = {}
    for flag in entry["script_flags"]:
        key, value = flag.lstrip("-").split("=")
        ranks[key] = int(value)
    return entry["key"].split("/")[0], entry["script_model"], ranks


def entries() -> list:
    return [dict(v, key=k) for k, v in manifest()["models"].items()]


def test_vector() -> dict:
    return manifest()["test_vectors"]["cifar10/ResNet32_DoubleShared/s8u1"]


def reference_weights(bnrand: bool = False) -> dict:
    name = "resnet32_double_s8u1_seed0_bnrand.pt" if bnrand else "resnet32_double_s8u1_seed0.pt"
    return torch.load(DATA / name, map_location="cpu", weights_only=True)
