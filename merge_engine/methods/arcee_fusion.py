"""Arcee Fusion: keep only the other model's changes whose importance (|Δ| times the KL
divergence of the rows' softmax) exceeds median + 1.5·IQR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge_engine.methods.registry import MergeMethod, register
from merge_engine.methods.sparsify import kth_smallest


def quantile_by_index(values: torch.Tensor, q: float) -> torch.Tensor:
    """sorted(values)[floor(q·(n−1))], found by selection; exact on every tensor size
    (mergekit sorts a random sample of a million entries on large tensors)."""
    flat = values.reshape(-1)
    return kth_smallest(flat, int(q * (flat.numel() - 1)) + 1)


def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    other = tensors[0]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (other - base).abs() * kl
    q1, median, q3 = (quantile_by_index(importance, x) for x in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * mask


register(
    MergeMethod(
        name="arcee_fusion",
        pretty_name="Arcee Fusion",
        doc="keep only the most important changes of one model over the base",
        paper="https://arcee.ai",
        kernel=arcee_fusion,
        base="required",
        min_inputs=1,
        max_inputs=1,
    )
)
