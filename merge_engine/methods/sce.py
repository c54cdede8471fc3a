"""SCE: Select the entries where the models disagree most, Calculate per-model weights from
the task vectors' energy, Erase minority signs."""

from __future__ import annotations

import torch

from merge_engine.methods.registry import MergeMethod, Param, register
from merge_engine.methods.sparsify import kth_largest


def sce(
    tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: float, int8_mask: bool
) -> torch.Tensor:
    vectors = torch.stack([t - base for t in tensors])  # (N, *shape)
    if select_topk < 1:
        variance = torch.var(vectors, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk)
        if k == 0:
            vectors = torch.zeros_like(vectors)
        else:
            magnitude = variance.abs().reshape(-1).float()
            vectors = vectors * (variance.abs() >= kth_largest(magnitude, k).to(variance.dtype)).to(
                vectors.dtype
            )
    total = vectors.sum(dim=0)
    agrees = torch.where(total >= 0, vectors > 0, vectors < 0)
    energy = vectors.square().reshape(len(tensors), -1).mean(dim=1)
    energy_sum = energy.sum().item()
    weights = (
        torch.ones_like(energy) / len(tensors) if abs(energy_sum) < 1e-6 else energy / energy_sum
    )
    weights = weights.reshape(-1, *([1] * (vectors.dim() - 1))) * agrees
    merged = (vectors * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
    return base + merged


register(
    MergeMethod(
        name="sce",
        pretty_name="SCE",
        doc="select high-variance entries, weight models by energy, erase minority signs",
        paper="https://arxiv.org/abs/2408.07990",
        kernel=sce,
        base="required",
        params=(
            Param(
                "select_topk",
                float,
                1.0,
                doc="fraction of entries (by variance across models) kept",
                low=0,
                high=1,
            ),
            Param(
                "int8_mask",
                bool,
                False,
                doc="accepted for mergekit compatibility; has no effect on the result",
            ),
        ),
    )
)
