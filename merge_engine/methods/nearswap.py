"""NearSwap: take the other model's value where it is close to the base's, keep the base elsewhere."""

from __future__ import annotations

import torch

from merge_engine.methods.registry import REQUIRED, MergeMethod, Param, register


def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    other = tensors[0]
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


register(
    MergeMethod(
        name="nearswap",
        pretty_name="NearSwap",
        doc="interpolate towards the other model where the two are within t of each other",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        kernel=nearswap,
        base="required",
        min_inputs=1,
        max_inputs=1,
        params=(
            Param(
                "t",
                float,
                REQUIRED,
                doc="distance below which the other model's value is taken",
                low=0,
            ),
        ),
    )
)
