"""Orthogonality regulariser over shared filter bases (paper eq. 5; SPEC section 4).

For a group g, stack its basis filters as rows of B_g (each filter flattened over in*kh*kw) and let
D_g = (B_g B_g^T - I)^2 element-wise. The penalty is one global average over the selected entries of all groups:

    R = sum_g selected_sum(D_g) / sum_g selected_count

Two forms, as in the authors' training scripts:

* ``include_unique=True`` (CIFAR-10): rows are the shared bases then every unique conv of the group's shared blocks;
  selected are all entries of the shared rows (shared-shared and shared->unique) plus each unique conv's own diagonal
  block. Unique filters of different layers are never compared.
* ``include_unique=False`` (CIFAR-100, ILSVRC): rows are the shared bases only; the whole matrix is selected.

Models describe their groups once through ``model.basis_groups()``; :class:`OrthogonalityRegularizer` keeps the
weight references and computes each group's terms with one matmul (plus one batched matmul for all unique blocks)
per step, with no Python loop over blocks and no host-device synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class BasisGroup:
    """The basis weights of one group: shared bases (in row order) and unique basis weights (block order)."""

    shared: list = field(default_factory=list)
    unique: list = field(default_factory=list)


def _rows(weights) -> torch.Tensor:
    return torch.cat([w.flatten(1) for w in weights], dim=0)


class OrthogonalityRegularizer:
    """Computes R for a model. Build once (after the model is moved to its device), call every step.

    Args:
        model: a model with ``basis_groups()`` (unwrapped: not DataParallel).
        include_unique: use the CIFAR-10 form (see module docstring).
    """

    def __init__(self, model: nn.Module, include_unique: bool) -> None:
        if getattr(model, "folded", False) is True:
            raise ValueError("this model was folded for inference (models.fold) and has no shared bases left; "
                             "build the regulariser for the model being trained")
        groups = model.basis_groups() if hasattr(model, "basis_groups") else []
        self.include_unique = include_unique
        self.groups = [g for g in groups if g.shared]
        count = 0
        for g in self.groups:
            n_shared = sum(w.shape[0] for w in g.shared)
            if include_unique and g.unique:
                n_unique = sum(w.shape[0] for w in g.unique)
                count += n_shared * (n_shared + n_unique) + sum(w.shape[0] ** 2 for w in g.unique)
            else:
                count += n_shared ** 2
        self.count = count

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __call__(self) -> torch.Tensor:
        if not self.groups:
            raise RuntimeError("this model has no shared bases to regularise")
        total = 0.0
        for g in self.groups:
            shared = _rows(g.shared)  # (n_S, d)
            unique = g.unique if self.include_unique else []
            rows = torch.cat([shared, _rows(unique)]) if unique else shared  # (n, d)
            gram = shared @ rows.t()  # (n_S, n): the selected rows of B B^T
            gram.diagonal().sub_(1.0)
            total = total + gram.square().sum()
            if unique:
                same_shape = len({tuple(w.shape) for w in unique}) == 1
                blocks = [torch.stack([w.flatten(1) for w in unique])] if same_shape else \
                    [w.flatten(1).unsqueeze(0) for w in unique]
                for b in blocks:  # (m, r, d): each unique conv's own r x r Gram block
                    ug = b @ b.transpose(1, 2)
                    ug.diagonal(dim1=1, dim2=2).sub_(1.0)
                    total = total + ug.square().sum()
        return total / self.count


def orthogonality_penalty(model: nn.Module, include_unique: bool) -> torch.Tensor:
    """R for ``model`` in one call (builds the regulariser each time; keep an :class:`OrthogonalityRegularizer` in
    training loops)."""
    return OrthogonalityRegularizer(model, include_unique)()


def orthogonality_penalty_reference(model: nn.Module, include_unique: bool) -> torch.Tensor:
    """The authors' straightforward form: full D_g per group, then a selection mask built on the fly.

    Kept as the slow reference for tests and for the benchmark's straightforward path.
    """
    total, count = 0.0, 0
    for g in model.basis_groups():
        if not g.shared:
            continue
        weights = list(g.shared) + (list(g.unique) if include_unique else [])
        b = _rows(weights)
        n_shared = sum(w.shape[0] for w in g.shared)
        d = (b @ b.t() - torch.eye(b.shape[0], device=b.device, dtype=b.dtype)) ** 2
        mask = torch.zeros_like(d, dtype=torch.bool)
        if include_unique:
            mask[:n_shared, :] = True
            start = n_shared
            for w in g.unique:
                mask[start:start + w.shape[0], start:start + w.shape[0]] = True
                start += w.shape[0]
        else:
            mask[:] = True
        total = total + d[mask].sum()
        count += int(mask.sum())
    return total / count
