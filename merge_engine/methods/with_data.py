"""The kernels of the methods that use data (pure tensor math; the statistics come from
:mod:`merge_engine.stats`)."""

from __future__ import annotations

import torch


def fisher_average(
    tensors: list[torch.Tensor],
    fishers: list[torch.Tensor],
    weights: list[float],
    floor: float = 1e-6,
) -> torch.Tensor:
    """θ* = Σ λᵢ Fᵢ θᵢ / Σ λᵢ Fᵢ element-wise; the floor makes an entry no model's data
    touched fall back to the weighted average."""
    numerator = torch.zeros_like(tensors[0], dtype=torch.float64)
    denominator = torch.zeros_like(numerator)
    for tensor, fisher, weight in zip(tensors, fishers, weights, strict=True):
        f = weight * fisher.double().clamp_min(floor)
        numerator += f * tensor.double()
        denominator += f
    return (numerator / denominator).to(tensors[0].dtype)


def regmean_linear(
    weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9, ridge: float = 1e-6
) -> torch.Tensor:
    """W* = (Σ Wᵢ G̃ᵢ)(Σ G̃ᵢ)⁻¹ for ``nn.Linear`` weights ([out, in]; y = x Wᵀ), with
    G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ). Solved in float64 with a ridge relative to the mean diagonal;
    an input feature no data ever activated (a zero row of Σ G) keeps the plain average."""
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    numerator = torch.zeros_like(weights[0], dtype=torch.float64)
    for weight, gram in zip(weights, grams, strict=True):
        gram = gram.double()
        shrunk = alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))
        total += shrunk
        numerator += weight.double() @ shrunk
    diagonal = torch.diag(total)
    dead = diagonal <= 0
    scale = diagonal[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=torch.float64)
    total += ridge * scale * torch.eye(total.shape[0], dtype=torch.float64)
    total[dead, dead] += 1.0  # keep the system solvable; those columns are replaced below
    merged = torch.linalg.solve(total, numerator.T).T
    if dead.any():
        merged[:, dead] = torch.stack([w.double()[:, dead] for w in weights]).mean(0)
    return merged.to(weights[0].dtype)
