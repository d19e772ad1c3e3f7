"""Orthogonality regulariser over shared filter bases (paper eq. 5; SPEC section 4).

For a group g, stack its basis filters as rows of B_g (flattened over in*kh*kw), D_g = (B_g B_g^T - I)^2 element-wise;
R = sum_g selected_sum(D_g) / sum_g selected_count, one global average. Two forms, as in the authors' scripts:

* ``include_unique=True`` (their CIFAR-10 script): rows are the shared bases, then every unique conv of the group's
  blocks; selected are the shared rows plus each unique conv's own diagonal block (different layers never compared).
* ``include_unique=False`` (their CIFAR-100 and ILSVRC scripts): the shared bases only, the whole matrix selected.

The authors' later scripts (SPEC_v2 section 4), for models with ``bases_by_position``: R = R(all ``_1`` bases) +
R(all ``_2`` bases), each basis its own group (no cross terms); each average is over a *set* of groups here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .basis import BasisGroup, basis_groups, split_by_position


def includes_unique(dataset: str) -> bool:
    """Whether the authors' training script for ``dataset`` regularises the unique filters too: CIFAR-10 only."""
    return dataset == "cifar10"


def _form(model: nn.Module, include_unique: bool | None) -> bool:
    if include_unique is not None:
        return include_unique
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError(
            "include_unique=None means the form of the model's dataset, but this model has no cfg "
            "(build it with models.get_model, or pass include_unique=True/False)"
        )
    return includes_unique(cfg.dataset)


def _rows(weights) -> torch.Tensor:
    return torch.cat([w.flatten(1) for w in weights], dim=0)


def basis_sets(model: nn.Module) -> list[list[BasisGroup]]:
    """The sets of groups R averages over, one average per set, summed: one set of all groups, or for a model whose
    ``bases_by_position`` is set, one set per basis position (the j-th basis of every group, each a group alone)."""
    groups = basis_groups(model)
    if not getattr(model, "bases_by_position", False):
        return [groups] if groups else []
    return [[BasisGroup([w], []) for w in position] for position in split_by_position(groups)]


class OrthogonalityRegularizer:
    """R for the (unwrapped) model being trained: build once, after moving the model to its device, call every
    step. ``include_unique``: the CIFAR-10 form; None: the form of the authors' script for ``model.cfg.dataset``."""

    def __init__(self, model: nn.Module, include_unique: bool | None = None) -> None:
        if getattr(model, "folded", False) is True:
            raise ValueError(
                "this model was folded for inference (models.fold) and has no shared bases left; "
                "build the regulariser for the model being trained"
            )
        self.sets = basis_sets(model)
        self.groups = [g for groups in self.sets for g in groups]
        self.include_unique = _form(model, include_unique) if self.groups else bool(include_unique)
        self.counts = [sum(self._count(g) for g in groups) for groups in self.sets]  # selected entries per set

    def _count(self, g: BasisGroup) -> int:
        n_shared = sum(w.shape[0] for w in g.shared)
        unique = g.unique if self.include_unique else []
        return n_shared * (n_shared + sum(w.shape[0] for w in unique)) + sum(w.shape[0] ** 2 for w in unique)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __call__(self) -> torch.Tensor:
        return sum(self.averages())

    def averages(self) -> list[torch.Tensor]:
        """The average of each set, whose sum is R (one set, or the ``_1`` and the ``_2`` bases' averages)."""
        if not self.groups:
            raise RuntimeError("this model has no shared bases to regularise")
        return [self._sum(groups) / count for groups, count in zip(self.sets, self.counts)]

    def _sum(self, groups: list[BasisGroup]) -> torch.Tensor:
        """The selected squared entries of ``groups``' B B^T - I, summed."""
        total = 0.0
        for g in groups:
            shared = _rows(g.shared)  # (n_S, d)
            unique = g.unique if self.include_unique else []
            rows = torch.cat([shared, _rows(unique)]) if unique else shared  # (n, d)
            gram = shared @ rows.t()  # (n_S, n): the selected rows of B B^T
            gram.diagonal().sub_(1.0)
            total = total + gram.square().sum()
            if not unique:
                continue
            if len({tuple(w.shape) for w in unique}) == 1:  # one batched matmul
                blocks = [torch.stack([w.flatten(1) for w in unique])]
            else:
                blocks = [w.flatten(1).unsqueeze(0) for w in unique]
            for b in blocks:  # (m, r, d): each unique conv's own r x r Gram block
                unique_gram = b @ b.transpose(1, 2)
                unique_gram.diagonal(dim1=1, dim2=2).sub_(1.0)
                total = total + unique_gram.square().sum()
        return total


def orthogonality_penalty(model: nn.Module, include_unique: bool | None = None) -> torch.Tensor:
    """R for ``model`` in one call (training loops keep an :class:`OrthogonalityRegularizer` instead)."""
    return OrthogonalityRegularizer(model, include_unique)()


def orthogonality_penalty_reference(model: nn.Module, include_unique: bool | None = None) -> torch.Tensor:
    """The authors' straightforward form, full D_g per group and a selection mask: the slow reference for tests and
    for the benchmark's straightforward path."""
    include_unique = _form(model, include_unique)
    return sum(_reference_set(groups, include_unique) for groups in basis_sets(model))


def _reference_set(groups: list[BasisGroup], include_unique: bool) -> torch.Tensor:
    total, count = 0.0, 0
    for g in groups:
        b = _rows(list(g.shared) + (list(g.unique) if include_unique else []))
        d = (b @ b.t() - torch.eye(b.shape[0], device=b.device, dtype=b.dtype)) ** 2
        mask = torch.ones_like(d, dtype=torch.bool)
        if include_unique:  # the shared rows, then each unique conv's own diagonal block
            start = sum(w.shape[0] for w in g.shared)
            mask[start:] = False
            for w in g.unique:
                mask[start : start + w.shape[0], start : start + w.shape[0]] = True
                start += w.shape[0]
        total = total + d[mask].sum()
        count += int(mask.sum())
    return total / count
