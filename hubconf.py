"""torch.hub entry points: one per registered model of "Learning Deeply Shared Filter Bases for Efficient ConvNets".

    model = torch.hub.load("/path/to/repo", "ResNet56_DoubleShared", source="local", dataset="cifar10",
                           shared_rank=16, unique_rank=1, checkpoint="ckpt.pth")
    model = torch.hub.load("/path/to/repo", "ResNet56_DoubleShared", source="local", pretrained=True)  # the paper's

Keywords: see :func:`models.pretrained.build_model` (ranks not given are read from the checkpoint). Models come in
train mode: call ``.eval()`` to predict. Every helper is private, so that torch.hub lists model names only.
"""

import inspect as _inspect
import os as _os
import sys as _sys

dependencies = ["torch", "torchvision"]

_REPO = _os.path.dirname(_os.path.realpath(__file__))


def _import_models():
    """This repository's ``models`` (torch.hub puts the repo first on sys.path; a plain ``import hubconf`` may not)."""
    if _REPO not in [_os.path.realpath(p) for p in _sys.path if p]:
        _sys.path.insert(0, _REPO)
    loaded = _sys.modules.get("models")
    where = getattr(loaded, "__file__", None) or ""
    if loaded is not None and not _os.path.realpath(where).startswith(_REPO + _os.sep):
        raise ImportError(
            f"another module named 'models' is already imported ({where or loaded!r}); load this "
            f"repository's hub entry points in a fresh Python process, or before the other 'models'"
        )
    import models  # with models.pretrained, which the package imports
    import models.summary  # noqa: F401  (the paper's rows, for pretrained=True)

    return models


_models = _import_models()


def _rank_args(name: str) -> list:
    """The rank keywords ``name`` takes on any of its datasets, in registry order."""
    return list(dict.fromkeys(a for d in _models.registry.datasets_of(name) for a in _models.model_rank_args(name, d)))


def _doc(name: str) -> str:
    """One line, as torch.hub.help shows it: the model, its datasets and its keywords with their defaults."""
    datasets = _models.registry.datasets_of(name)
    variant = name.split("_", 1)[1] if "_" in name else None
    what = _models.registry.VARIANTS[variant][2] if variant else "plain baseline"
    args = [f"dataset={datasets[0]!r}" if len(datasets) == 1 else f"dataset={'|'.join(datasets)} (required)"]
    for arg in _rank_args(name):
        values = {d: _models.registry.model_defaults(name, d).get(arg) for d in datasets}
        if len(set(values.values())) == 1:
            args.append(f"{arg}={values[datasets[0]]}")
        else:
            args.append(f"{arg}=" + "|".join(f"{v} ({d})" for d, v in values.items()))
    from_file = "; ranks not given are read from it" if len(args) > 1 else ""
    rows = [r.row for r in _models.summary.PAPER_ROWS if r.model == name and r.weights is not None]
    published = f", pretrained=False (True: the paper's published {' / '.join(rows)})" if rows else ""
    return (
        f"{name}, {what} ({', '.join(datasets)}); kwargs: {', '.join(args)}, checkpoint=None (a local "
        f"file{from_file}){published}."
    )


def _make_entry(name: str):
    def entry(dataset=None, *, shared_rank=None, unique_rank=None, num_classes=None, checkpoint=None, pretrained=False):
        return _models.pretrained.build_model(
            name,
            dataset,
            shared_rank=shared_rank,
            unique_rank=unique_rank,
            num_classes=num_classes,
            checkpoint=checkpoint,
            pretrained=pretrained,
        )

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = _doc(name)
    takes = set(_rank_args(name))  # show only the rank keywords this model takes (others are refused anyway)
    signature = _inspect.signature(entry)
    entry.__signature__ = signature.replace(
        parameters=[
            p for p in signature.parameters.values() if p.name not in ("shared_rank", "unique_rank") or p.name in takes
        ]
    )
    return entry


__all__ = sorted({qualified.split("/", 1)[1] for qualified in _models.list_models()})
for _name in __all__:
    globals()[_name] = _make_entry(_name)
