"""Interpolation on the hypersphere: SLERP, NuSLERP, Multi-SLERP and the Karcher mean."""

from __future__ import annotations

import torch

from merge_engine.methods.linear import accumulation_dtype
from merge_engine.methods.registry import REQUIRED, MergeMethod, Param, register


def slerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1), on whole flattened
    tensors; nearly collinear pairs (|cos| > 0.9995) fall back to linear interpolation."""
    dtype = accumulation_dtype(base)
    a = base.reshape(-1).to(dtype)
    b = tensors[0].reshape(-1).to(dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = (torch.dot(a / norm_a, b / norm_b)).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(base.shape).to(base.dtype)


def nuslerp_pair(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_flatten: bool,
    nuslerp_row_wise: bool,
) -> torch.Tensor:
    """SLERP between two models with weights; with a base, between their task vectors."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], nuslerp_row_wise, nuslerp_flatten)
    return base + nuslerp_pair(
        t, tensors[0] - base, tensors[1] - base, nuslerp_row_wise, nuslerp_flatten
    )


def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere through the tangent space at the weighted mean."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)  # (N, *shape)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(tensors), -1)  # (N, n)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            result = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])
            return result if base is None else result + base
        raise ValueError(
            "the weighted sum of the input directions is zero (antipodal inputs with balancing weights); change the weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return result if base is None else result + base


def karcher(tensors: list[torch.Tensor], base: None, *, max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Riemannian (Karcher) mean of the directions, scaled by the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    dtype = accumulation_dtype(tensors[0])
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0 else (t / n).to(t.dtype)
        for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / total for i in valid]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(valid_alphas, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


register(
    MergeMethod(
        name="slerp",
        pretty_name="SLERP",
        doc="spherical interpolation between the base and one other model",
        paper="https://en.wikipedia.org/wiki/Slerp",
        kernel=slerp,
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(
            Param(
                "t",
                float,
                REQUIRED,
                doc="0 gives the base model, 1 the other model; outside [0, 1] extrapolates",
            ),
        ),
    )
)
register(
    MergeMethod(
        name="nuslerp",
        pretty_name="NuSLERP",
        doc="SLERP of two models (or of their task vectors, with a base) by weights",
        paper=None,
        kernel=nuslerp,
        base="optional",
        min_inputs=2,
        max_inputs=2,
        params=(
            Param("weight", float, REQUIRED, "per_model", "relative weight; t = w₂ / (w₁ + w₂)"),
            Param(
                "nuslerp_flatten",
                bool,
                True,
                doc="interpolate whole tensors (false: row or column vectors)",
            ),
            Param(
                "nuslerp_row_wise",
                bool,
                False,
                doc="with nuslerp_flatten false: interpolate rows instead of columns",
            ),
        ),
    )
)
register(
    MergeMethod(
        name="multislerp",
        pretty_name="Multi-SLERP",
        doc="barycentric interpolation of any number of models on the hypersphere",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        kernel=multislerp,
        base="optional",
        params=(
            Param("weight", float, REQUIRED, "per_model", "this model's weight"),
            Param("normalize_weights", bool, True, doc="scale the weights to sum to 1"),
            Param("eps", float, 1e-8, doc="numerical floor for norms", low=0, low_open=True),
        ),
    )
)
register(
    MergeMethod(
        name="karcher",
        pretty_name="Karcher Mean",
        doc="Riemannian mean of the models' directions, scaled by their mean norm",
        paper="https://arxiv.org/abs/2603.04972",
        kernel=karcher,
        params=(
            Param("max_iter", int, 10, doc="iterations of the fixed-point solver", low=1),
            Param(
                "tol",
                float,
                1e-5,
                doc="stop when the tangent step is this small",
                low=0,
                low_open=True,
            ),
        ),
    )
)
