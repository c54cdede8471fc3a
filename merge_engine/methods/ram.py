"""Reinforced Agent Merging: entries changed by one model keep their full value, entries
changed by several are averaged over the models that changed them (RAM+ boosts the unique ones)."""

from __future__ import annotations

import torch

from merge_engine.methods.registry import MergeMethod, Param, register


def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(N, n) task vectors, which entries each changed, and how many models changed each entry."""
    flat = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat * changed, changed, counts


def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    vectors, _, counts = _task_vectors(tensors, base, epsilon)
    merged = (vectors * (counts == 1) + vectors * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape_as(base)


def ramplus_tl(
    tensors: list[torch.Tensor], base: torch.Tensor, *, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    vectors, changed, counts = _task_vectors(tensors, base, epsilon)
    unique, shared = counts == 1, counts > 1
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)  # (N,)
    merged = (vectors * unique * boost.unsqueeze(-1) + vectors * shared / counts.clamp(min=1)).sum(
        dim=0
    )
    return base + merged.reshape_as(base)


_EPSILON = Param(
    "epsilon", float, 1e-5, doc="a change smaller than this counts as no change", low=0
)
register(
    MergeMethod(
        name="ram",
        pretty_name="Reinforced Agent Merging",
        doc="keep unique changes whole, average the overlapping ones",
        paper="https://arxiv.org/abs/2601.13572",
        kernel=ram,
        base="required",
        params=(_EPSILON,),
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
        doc="RAM with unique changes boosted by the model's share of overlapping entries",
        paper="https://arxiv.org/abs/2601.13572",
        kernel=ramplus_tl,
        base="required",
        params=(
            Param("r", float, 0.1, doc="strength of the boost", low=0),
            Param("alpha", float, 0.2, doc="cap on the overlap ratio", low=0),
            _EPSILON,
        ),
    )
)
