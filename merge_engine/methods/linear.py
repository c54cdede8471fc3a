"""Model soup: the weighted average of the inputs."""

from __future__ import annotations

from typing import Any

import torch

from merge_engine.methods.registry import REQUIRED, MergeMethod, Param, register


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def linear(
    tensors: list[torch.Tensor], base: None, *, weight: list[float], normalize: bool
) -> torch.Tensor:
    """Σ wᵢθᵢ (/ Σ wᵢ when ``normalize``), accumulated in float32 (float64 for float64 inputs)."""
    dtype = accumulation_dtype(tensors[0])
    coefficients = torch.tensor(weight, dtype=dtype, device=tensors[0].device)
    result = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, coefficient in zip(tensors, coefficients, strict=True):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(coefficients.sum())
    return result.to(tensors[0].dtype)


def _weights_not_cancelling(shared: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    if shared["normalize"] and abs(sum(m["weight"] for m in per_model)) < 1e-8:
        return "the weights sum to zero, so normalize would divide by zero; change a weight or set normalize: false"
    return None


register(
    MergeMethod(
        name="linear",
        pretty_name="Linear (model soup)",
        doc="weighted average of the models' parameters",
        paper="https://arxiv.org/abs/2203.05482",
        kernel=linear,
        params=(
            Param("weight", float, REQUIRED, "per_model", "this model's share of the average"),
            Param("normalize", bool, True, doc="divide by the sum of the weights"),
        ),
        check=_weights_not_cancelling,
    )
)
