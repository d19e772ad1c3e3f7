"""Checkpoint file -> model, the one path for the eval scripts, resume, torch.hub and export (SPEC section 7).

Files are untrusted: loaded ``weights_only``, and the ranks this project's files record (``model_kwargs``) must agree
with the tensor shapes before any model is built. Every refusal is a CheckpointError naming the flags that fit the file.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn

from .registry import (
    DATASETS,
    LAYOUTS,
    NUM_CLASSES,
    RANK_ARGS,
    canonical_name,
    check_rank_type,
    datasets_of,
    get_model,
    list_models,
    model_defaults,
    model_rank_args,
    spell_args,
    unknown_model,
)

_PREFIXES = ("module.", "_orig_mod.")
FORMAT_VERSION = 1  # of this project's checkpoint dict (utils.checkpoint writes it; models.convert too)
Source = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def error_line(e: BaseException) -> str:
    """``'TypeError: <first line of the message>'``, for one-line errors that wrap another."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def read_checkpoint(path: Source, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for missing or unreadable files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint (the file is empty)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": a second line before our one
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects we refuse to run
        raise CheckpointError(f"checkpoint {path!r} {_unreadable(path, e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    check_fields(obj, path)
    return obj


def _unreadable(path: str, e: Exception) -> str:
    """Why torch.load refused a file, in one line: torch's own message advises unsafe loading (never ours to give)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/archive_format") for n in names) and not any(n.endswith("/data.pkl") for n in names):
            return (
                "is a torch.export program (.pt2, e.g. written by models.export), not a checkpoint: run it with "
                "torch.export.load(path).module(); evaluate the .pth checkpoint it was exported from"
            )
    else:
        with open(path, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"\x80"):  # every torch file is a zip archive or a pickle (protocol 2+ opcode)
            try:
                head[: len(head) - 3 if len(head) == 4096 else None].decode("utf-8")  # a character cut at the end
                what = "text: a web page or a note saved in its place?"
            except UnicodeDecodeError:
                what = "neither a zip archive nor a pickle"
            return f"is not a readable PyTorch checkpoint ({what})"
    text = str(e)  # torch's first line advises weights_only=False, with terminal colour codes: not ours to print
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return (
            f"holds pickled Python objects ({pickled.group(1)}; a whole model saved with torch.save(model)?), "
            f"which are not loaded because unpickling them can run any code: save model.state_dict() instead"
        )
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, flags=re.S)
    detail = " ".join(reason.group(1).split()) if reason else (text.strip().splitlines() or ["no detail"])[0]
    return f"is not a readable PyTorch checkpoint ({type(e).__name__}: {detail})"


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()  # the authors store acc as a 0-dim tensor
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _percent(v) -> bool:
    return _number(v) and float(v) <= 100


def _rng_ok(state) -> bool:
    """Whether ``state`` is what utils.checkpoint.capture_rng_state saves: tried on scratch generators."""
    if not isinstance(state, dict):
        return False
    try:
        if "torch" in state:
            torch.Generator().set_state(state["torch"])
        if "numpy" in state:
            n = state["numpy"]
            keys = n["keys"].numpy().astype("uint32")
            np.random.RandomState().set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
        if "python" in state:
            p = state["python"]
            random.Random().setstate((p["version"], tuple(p["state"]), p["gauss"]))
        return all(isinstance(t, torch.Tensor) for t in state.get("cuda") or [])
    except Exception:  # noqa: BLE001  (any wrong type or size)
        return False


# The fields this project reads, what each must be (None: absent), and a test; a hand-edited or damaged value is
# refused here, as the file is read, in one line.
_FIELDS = {
    "epoch": ("a non-negative integer", _count),
    "best_epoch": ("a non-negative integer", _count),
    "stage": ("a non-negative integer", _count),
    "epoch_step": ("a non-negative integer", _count),
    "epoch_samples": ("a non-negative integer", _count),
    "world_size": ("a non-negative integer", _count),
    "acc": ("a number from 0 to 100", _percent),
    "best_acc": ("a number from 0 to 100", _percent),
    "best_acc5": ("a number from 0 to 100", _percent),
    "val_acc": ("a number from 0 to 100", _percent),
    "val_acc5": ("a number from 0 to 100", _percent),
    "test_acc": ("a number from 0 to 100", _percent),
    "test_acc5": ("a number from 0 to 100", _percent),
    "train_seconds": ("a non-negative number", _number),
    "dataset": (f"one of {', '.join(DATASETS)}", lambda v: isinstance(v, str) and v in DATASETS),
    "model": ("a model name", lambda v: isinstance(v, str)),
    "selection": ("'val' or 'test'", lambda v: v in ("val", "test")),
    "model_kwargs": (
        "a dict of rank names to positive integers",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _count(x) and x > 0 for k, x in v.items()),
    ),
    "args": ("a dict of flags", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
    "val_split": (
        "a dict {'n': images, 'seed': integer}",
        lambda v: isinstance(v, dict) and _count(v.get("n")) and _count(v.get("seed", 0)),
    ),
    "epoch_totals": (
        "a list of 5 non-negative numbers",
        lambda v: isinstance(v, list) and len(v) == 5 and all(_number(x) for x in v),
    ),
    "rng_state": ("the random states this project saves", _rng_ok),
    "rng_states": ("a list of random states", lambda v: isinstance(v, list) and all(_rng_ok(x) for x in v)),
    "optimizer_state_dict": ("a dict", lambda v: isinstance(v, dict)),
    "scaler_state_dict": ("a dict", lambda v: isinstance(v, dict)),
}


def check_fields(obj: dict, path: str) -> None:
    """Refuse a checkpoint whose recorded fields have the wrong type or range (one line naming the field)."""
    for key, (expected, ok) in _FIELDS.items():
        value = obj.get(key)
        if value is not None and not ok(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
            raise CheckpointError(
                f"checkpoint {path!r} records {key}={shown}, not {expected}: the file was altered or damaged; "
                f"use an unaltered copy"
            )


def state_dict_of(obj: dict) -> dict:
    """The weights of a checkpoint dict or raw state_dict, with wrapper prefixes removed so keys match a bare model."""
    state = obj.get("net_state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no 'net_state_dict' and is not a state_dict of tensors")
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):  # "module." and "_orig_mod.", possibly nested
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``DataParallel``/``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def checkpoint_acc(obj: dict) -> float | None:
    """The checkpoint's ``acc`` as a float (the authors store a 0-dim tensor), or None."""
    acc = obj.get("acc")
    if isinstance(acc, torch.Tensor) and acc.numel() == 1:
        acc = acc.item()
    return float(acc) if isinstance(acc, (int, float)) and not isinstance(acc, bool) else None


def check_identity(obj: dict, path: str, *, dataset: str, model: str | None = None) -> None:
    """Refuse a checkpoint that records another dataset or model (the authors' files record neither: accepted)."""
    recorded_ds, recorded_model = obj.get("dataset"), obj.get("model")
    if recorded_ds is not None and recorded_ds != dataset:
        raise CheckpointError(
            f"checkpoint {path!r} was trained on {recorded_ds} ({recorded_model}), not {dataset}; "
            f"use {spell_args({'dataset': recorded_ds})}"
        )
    if model is not None and recorded_model is not None and recorded_model != model:
        kwargs = obj.get("model_kwargs")
        fits = spell_args({"model": recorded_model, **(kwargs if isinstance(kwargs, dict) else {})})
        raise CheckpointError(f"checkpoint {path!r} holds a {recorded_model}, not a {model}; pass {fits}")


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _layout(name: str, dataset: str, num_classes: int | None = None, **ranks) -> dict:
    """The keys and shapes of a registered model (built on the meta device: no memory, no RNG draws)."""
    return dict(_cached_layout(name, dataset, num_classes, tuple(sorted(ranks.items()))))


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Random fills do nothing: a layout needs shapes only, and on the meta device ``normal_`` runs as a slow Python
    reference (building ResNet56 took 3 s on first use, then ~1 ms per init call)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_) or getattr(func, "__module__", "") == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=256)  # probing a file asks for the same few layouts again and again
def _cached_layout(name: str, dataset: str, num_classes: int | None, ranks: tuple) -> tuple:
    with torch.device("meta"), _SkipInit():
        return tuple(_shapes(get_model(name, dataset, num_classes=num_classes, **dict(ranks))).items())


def head_classes(dataset: str, state: dict) -> int | None:
    """The class count of an ILSVRC-family file that is not 1000 (they train on any ImageFolder tree), read off its
    last tensor, the head's bias in every family (bounded by the file itself); None: the dataset's own count."""
    last = next(reversed(state.values()), None) if dataset == "ilsvrc" else None
    classes = int(last.shape[0]) if isinstance(last, torch.Tensor) and last.dim() == 1 else None
    return None if classes in (None, NUM_CLASSES[dataset]) else classes


def _shape_mismatch(expected: dict, state: dict) -> str:
    """Why ``state`` cannot load into a model with these shapes ('' when it can)."""
    missing = [k for k in expected if k not in state]
    if missing:
        return f"{len(missing)} missing keys, e.g. {missing[0]!r}"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}"
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            return f"{k!r} has shape {tuple(state[k].shape)}, the model expects {shape}"
    return ""


def infer_ranks(name: str, dataset: str, state: dict) -> dict:
    """The ranks of ``name`` read off a state_dict's shapes, which are affine in the ranks: one probe per rank argument
    gives the slope, and every shape is verified. Builds only default-size models; ValueError when no ranks fit."""
    base, classes = model_defaults(name, dataset), head_classes(dataset, state)
    ref = _layout(name, dataset, classes, **base)
    ranks = dict(base)
    for arg, step in base.items():  # probe at twice the default: valid for grouped bases too
        moved = _layout(name, dataset, classes, **{**base, arg: base[arg] + step})
        for key, shape in ref.items():
            dims = [i for i, (a, b) in enumerate(zip(shape, moved[key])) if a != b]
            if dims and key in state and len(state[key].shape) == len(shape):
                i = dims[0]
                value, rest = divmod((state[key].shape[i] - shape[i]) * step, moved[key][i] - shape[i])
                if rest == 0 and base[arg] + value > 0:
                    ranks[arg] = base[arg] + value
                break
    problem = _shape_mismatch(ref if ranks == base else _layout(name, dataset, classes, **ranks), state)
    if problem:
        raise ValueError(f"checkpoint does not match {name} ({dataset}) at any ranks: {problem}")
    return ranks


def pick_layout(name: str, dataset: str, state: dict) -> str:
    """``name``, or the older published layout of it (:data:`~models.registry.LAYOUTS`) whose keys ``state`` has."""
    others = LAYOUTS.get((dataset, name), ())
    if not others or set(_layout(name, dataset)) == set(state):
        return name
    return next((o for o in others if set(_layout(o, dataset)) == set(state)), name)


def _depth(name: str) -> int:
    """The number in a model name (ResNet56 -> 56), 0 without one."""
    digits = re.search(r"\d+", name)
    return int(digits.group()) if digits else 0


def _guess_model(dataset: str, state: dict) -> dict | None:
    """``{"model": name, **ranks}`` of the ``dataset`` model whose keys and shapes fit ``state``, or None. Shallow
    names are tried first: a layout costs time in proportion to depth (ResNet1202's 3 s)."""
    for name in sorted(list_models(dataset), key=_depth):
        try:
            if set(_layout(name, dataset)) != set(state):
                continue
            return {"model": name, **infer_ranks(name, dataset, state)}
        except ValueError:
            continue
    return None


def guess_fit(state: dict, dataset: str | None = None) -> dict | None:
    """The arguments of the model ``state`` fits, for error messages: a ``dataset`` model first, else another
    dataset's (then with ``"dataset"``); None when none fits."""
    if dataset is not None:
        fit = _guess_model(dataset, state)
        if fit is not None:
            return fit
    for other in DATASETS:
        fit = _guess_model(other, state) if other != dataset else None
        if fit is not None:
            return {"dataset": other, **fit}
    return None


def load_weights(model: nn.Module, checkpoint: Source | dict, map_location="cpu") -> dict:
    """Load a path, checkpoint dict or state_dict into ``model`` strictly; returns the dict (errors name the flags)."""
    obj = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, map_location)
    state = state_dict_of(obj)
    target = unwrap_model(model)
    problem = _shape_mismatch(_shapes(target), state)
    if problem:
        raise CheckpointError(_explain_mismatch(target, state, problem))
    target.load_state_dict(state, strict=True)
    return obj


def _explain_mismatch(model: nn.Module, state: dict, problem: str) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return f"checkpoint does not fit this model: {problem}"
    try:
        ranks = infer_ranks(cfg.name, cfg.dataset, state)
    except ValueError:
        return (
            f"checkpoint is not a {cfg.dataset} {cfg.name} ({problem}); check the model name and the dataset "
            f"the checkpoint was trained on"
        )
    return (
        f"checkpoint was trained with {spell_args(ranks)} but the model was built with "
        f"{spell_args(cfg.build_kwargs())}; pass {spell_args(ranks)}"
    )


def resolve_model(
    ckpt: dict,
    path: str,
    *,
    model: str | None = None,
    dataset: str | None = None,
    shared_rank: int | None = None,
    unique_rank: int | None = None,
) -> tuple[nn.Module, bool]:
    """The model ``ckpt`` holds, built without random init (load its weights next), and whether its ranks had to be
    read off the tensor shapes. Recorded ranks are trusted only once the shapes confirm them, so a hostile file cannot
    ask for any model size."""
    state = state_dict_of(ckpt)
    dataset = dataset or ckpt.get("dataset")
    if dataset is None:
        fit = guess_fit(state, None)
        hint = f"; the file fits {spell_args(fit)}" if fit else f" (one of {', '.join(DATASETS)})"
        raise CheckpointError(
            f"checkpoint {path!r} records no dataset (an authors' file?): give the dataset it was trained on{hint}"
        )
    model = pick_layout(canonical_name(model), dataset, state) if model else model
    check_identity(ckpt, path, dataset=dataset, model=model)
    name = model or ckpt.get("model")
    if name is None:
        fit = guess_fit(state, dataset)
        hint = f"; the file fits {spell_args(fit)}" if fit else ""
        raise CheckpointError(f"checkpoint {path!r} records no model (an authors' file?): give the model{hint}")
    try:
        takes = model_rank_args(name, dataset)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from None
    try:
        ranks = infer_ranks(name, dataset, state)
    except ValueError:
        fit = guess_fit(state, dataset)
        hint = (
            f"; the file fits {spell_args(fit)}" if fit else "; check the model name and the dataset it was trained on"
        )
        heads = head_classes(dataset, state)
        why = "at any ranks" if takes else f"({_shape_mismatch(_layout(name, dataset, heads), state)})"
        raise CheckpointError(f"checkpoint {path!r} is not a {dataset} {name} {why}{hint}") from None
    recorded = ckpt.get("model_kwargs")
    if isinstance(recorded, dict):
        claimed = {**model_defaults(name, dataset), **{k: v for k, v in recorded.items() if k in takes}}
        if claimed != ranks:
            raise CheckpointError(
                f"checkpoint {path!r} records {spell_args(claimed)} but its tensors hold "
                f"{spell_args(ranks)}: its 'model_kwargs' were altered; use an unaltered copy or "
                f"set them to {ranks}"
            )
    given = {k: v for k, v in zip(RANK_ARGS, (shared_rank, unique_rank)) if v is not None and k in takes}
    for k, v in given.items():  # Python callers (load_model, the hub): a string is their mistake, not the file's
        check_rank_type(k, v)
    wrong = {k: v for k, v in given.items() if ranks[k] != v}
    if wrong:
        raise CheckpointError(
            f"checkpoint {path!r} was trained with {spell_args(ranks)}, not {spell_args(wrong)}; "
            f"pass {spell_args(ranks)}"
        )
    inferred = bool(takes) and not isinstance(recorded, dict) and given.keys() != set(takes)
    with _SkipInit():  # the caller loads every tensor next (ILSVRC ResNet34: 0.1 s instead of 3 s)
        return get_model(name, dataset, num_classes=head_classes(dataset, state), **ranks), inferred


def load_model(
    path: Source,
    *,
    model: str | None = None,
    dataset: str | None = None,
    shared_rank: int | None = None,
    unique_rank: int | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """``(model in eval mode, checkpoint dict)`` from a file; the authors' files need ``model`` and ``dataset``.
    Arguments given must agree with the file; ranks the model does not take are ignored, as the scripts do."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path, map_location)
    net, _ = resolve_model(ckpt, path, model=model, dataset=dataset, shared_rank=shared_rank, unique_rank=unique_rank)
    load_weights(net, ckpt)
    return net.eval(), ckpt


def build_model(
    name: str,
    dataset: str | None = None,
    *,
    shared_rank: int | None = None,
    unique_rank: int | None = None,
    num_classes: int | None = None,
    checkpoint: Source | dict | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """The hub's entry points: model ``name`` with the weights of ``checkpoint`` (path or dict), in train mode.
    ``dataset`` may be omitted when the name or the file fixes it; ranks not given come from the file, else defaults.
    ``pretrained=True``: the paper's published checkpoint of ``name`` at the ranks given (:mod:`models.download`)."""
    name = canonical_name(name)
    registered = datasets_of(name)
    if not registered:
        raise ValueError(unknown_model(name))
    if pretrained:
        from .download import fetch  # which imports this module
        from .summary import published_row

        if checkpoint is not None:
            raise ValueError("pass either pretrained=True (the paper's published weights) or checkpoint=, not both")
        if dataset is None and len(registered) > 1:
            raise ValueError(f"{name} exists for {' and '.join(registered)}: pass dataset= one of them")
        given = {k: v for k, v in zip(RANK_ARGS, (shared_rank, unique_rank)) if v is not None}
        checkpoint = fetch(published_row(dataset or registered[0], name, given))
    obj = checkpoint if checkpoint is None or isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    recorded = obj.get("dataset") if obj is not None and isinstance(obj.get("dataset"), str) else None
    dataset = dataset or recorded or (registered[0] if len(registered) == 1 else None)
    if dataset is None:
        raise ValueError(f"{name} exists for {' and '.join(registered)}: pass dataset= one of them")
    if obj is None:
        return get_model(name, dataset, shared_rank=shared_rank, unique_rank=unique_rank, num_classes=num_classes)
    if num_classes is not None:
        raise ValueError("num_classes builds a new head; a checkpoint fixes the head it was trained with")
    where = "checkpoint" if obj is checkpoint else os.fspath(checkpoint)
    model, _ = resolve_model(obj, where, model=name, dataset=dataset, shared_rank=shared_rank, unique_rank=unique_rank)
    load_weights(model, obj)
    return model.train()
