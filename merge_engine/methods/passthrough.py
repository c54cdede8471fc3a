"""Passthrough: copy one model's tensor, optionally scaled; with slices, it stacks layers (frankenmerging)."""

from __future__ import annotations

import torch

from merge_engine.methods.registry import MergeMethod, Param, register


def passthrough(tensors: list[torch.Tensor], base: None, *, scale: list[float]) -> torch.Tensor:
    return tensors[0] if scale[0] == 1 else tensors[0] * scale[0]


register(
    MergeMethod(
        name="passthrough",
        pretty_name="Passthrough",
        doc="copy tensors unchanged; over slices, stack layer ranges of one or several models",
        paper="https://huggingface.co/upstage/SOLAR-10.7B-v1.0",
        kernel=passthrough,
        max_inputs=1,
        layer_stacking=True,
        params=(Param("scale", float, 1.0, "per_model", "multiply the copied tensor by this"),),
    )
)
