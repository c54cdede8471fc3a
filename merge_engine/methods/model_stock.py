"""Model Stock: move from the base towards the average by a factor set by the angle between
the fine-tuned offsets, t = N·cosθ / (1 + (N−1)·cosθ)."""

from __future__ import annotations

import torch

from merge_engine.methods.registry import MergeMethod, Param, register


def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool
) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(
        singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denominator)
    )
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        pretty_name="Model Stock",
        doc="interpolate base and average by the geometry of the fine-tuned offsets (needs two or more models)",
        paper="https://arxiv.org/abs/2403.19522",
        kernel=model_stock,
        base="required",
        min_inputs=2,
        params=(
            Param(
                "filter_wise",
                bool,
                False,
                doc="one interpolation factor per row instead of per tensor",
            ),
        ),
    )
)
