"""The methods that use data: Fisher merging and RegMean. Their kernels are pure tensor math
on the statistics that :mod:`merge_engine.data.stats` collected (one per input, or None for a
tensor no statistic covers, which then takes the plain or weighted average)."""

from __future__ import annotations

from typing import Any

import torch

from merge_engine.data.stats import Statistic
from merge_engine.methods.linear import linear
from merge_engine.methods.registry import MergeMethod, Param, register


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
    G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ). The products Wᵢ G̃ᵢ (the bulk of the work) are taken in the
    weights' precision, float32 at least; the system is solved in float64, by Cholesky (Σ G̃ᵢ
    plus a ridge relative to its mean diagonal is positive definite), by LU if rounding made it
    not. An input feature no data ever activated (a zero row of Σ G) keeps the plain average."""
    dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    numerator = torch.zeros_like(weights[0], dtype=torch.float64)
    for weight, gram in zip(weights, grams, strict=True):
        shrunk = gram.to(torch.float64) * alpha  # off-diagonal scaled by α,
        shrunk.diagonal().copy_(gram.diagonal())  # the diagonal kept whole
        total += shrunk
        numerator += (weight.to(dtype) @ shrunk.to(dtype)).to(torch.float64)
    diagonal = total.diagonal()
    dead = diagonal <= 0
    scale = diagonal[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=torch.float64)
    diagonal += ridge * scale
    diagonal[dead] += 1.0  # keep the system solvable; those columns are replaced below
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        merged = torch.cholesky_solve(numerator.T, factor).T
    else:
        merged = torch.linalg.solve(total, numerator.T).T
    if dead.any():
        merged[:, dead] = torch.stack([w.double()[:, dead] for w in weights]).mean(0)
    return merged.to(weights[0].dtype)


def _covered(stats: list[Statistic | None] | None, use_data: bool) -> bool:
    return use_data and stats is not None and all(s is not None for s in stats)


def regmean(
    tensors: list[torch.Tensor],
    base: None,
    *,
    alpha: float,
    ridge: float,
    use_data: bool,
    stats: list[Statistic | None] | None = None,
) -> torch.Tensor:
    """A linear layer's weight from the closed form; every other tensor the plain average."""
    if not _covered(stats, use_data) or tensors[0].dim() != 2:
        return linear(tensors, None, weight=[1.0] * len(tensors), normalize=True)
    assert stats is not None
    if stats[0].transposed:  # [in, out]: solve on the transpose
        merged = regmean_linear([t.T for t in tensors], [s.value for s in stats], alpha, ridge)
        return merged.T.contiguous()
    return regmean_linear(tensors, [s.value for s in stats], alpha, ridge)


def fisher(
    tensors: list[torch.Tensor],
    base: None,
    *,
    weight: list[float],
    floor: float,
    normalize: bool,
    fisher: str,
    use_data: bool,
    stats: list[Statistic | None] | None = None,
) -> torch.Tensor:
    """Σ λᵢ Fᵢ θᵢ / Σ λᵢ Fᵢ per entry; ``normalize`` divides each model's Fisher by its mean
    over the whole model first. A tensor without statistics takes the weighted average."""
    if not _covered(stats, use_data):
        return linear(tensors, None, weight=weight, normalize=True)
    assert stats is not None
    fishers = [s.value / s.model_mean if normalize else s.value for s in stats]
    return fisher_average(tensors, fishers, weight, floor)


def _weights_positive(shared: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    if sum(m["weight"] for m in per_model) <= 0:
        return "the weights sum to zero; give at least one model a positive weight"
    return None


USE_DATA = Param(
    "use_data",
    bool,
    True,
    doc="false gives a tensor the plain average instead; set it with a filter for task-specific heads",
)

register(
    MergeMethod(
        name="regmean",
        pretty_name="RegMean",
        doc="per linear layer, the weights that best reproduce every model's outputs on its own calibration data; the plain average elsewhere",
        paper="https://arxiv.org/abs/2212.09849",
        kernel=regmean,
        params=(
            Param(
                "alpha",
                float,
                0.9,
                doc="share of each Gram matrix's off-diagonal kept: 1 is the exact least-squares merge, 0 a per-feature weighted average",
                low=0,
                high=1,
            ),
            Param(
                "ridge",
                float,
                1e-6,
                doc="added to the summed Gram matrix's diagonal, relative to its mean, so a near-singular system still solves",
                low=0,
            ),
            USE_DATA,
        ),
        min_inputs=2,
        statistic=lambda shared: "gram",
    )
)

register(
    MergeMethod(
        name="fisher",
        pretty_name="Fisher merging",
        doc="each parameter averaged with weights from each model's diagonal Fisher information on its own calibration data",
        paper="https://arxiv.org/abs/2111.09832",
        kernel=fisher,
        params=(
            Param("weight", float, 1.0, "per_model", "λ, how much this model counts", low=0),
            Param(
                "floor",
                float,
                1e-6,
                doc="smallest Fisher value used, so an entry no data touched takes the weighted average",
                low=0,
                low_open=True,
            ),
            Param(
                "normalize",
                bool,
                True,
                doc="divide each model's Fisher by its mean, so no model outweighs the others by the scale of its gradients",
            ),
            Param(
                "fisher",
                str,
                "empirical",
                doc="empirical: gradients at the data's labels; exact: at labels sampled from the model",
                choices=("empirical", "exact"),
            ),
            USE_DATA,
        ),
        min_inputs=2,
        statistic=lambda shared: f"fisher_{shared['fisher']}",
        check=_weights_positive,
    )
)
