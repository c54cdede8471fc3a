"""The output's ``config.json``: the donor's config, with the layer count and per-layer lists
of a slices merge following the stacked layers, and the dtype the tensors are written in."""

from __future__ import annotations

import copy
from typing import Any

from merge_engine.errors import IncompatibleModelsError
from merge_engine.plan.merge_plan import DTYPES, TensorTask
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.inspection import LAYER_COUNT_KEYS, ModelSource


def output_config(
    recipe: Recipe,
    sources: dict[ModelReference, ModelSource],
    tasks: list[TensorTask],
    layer_sources: list[tuple[ModelReference, int]],
) -> dict[str, Any]:
    """``layer_sources``: the model and input layer of each output layer of a slices merge."""
    donor = sources[recipe.donor()]
    config = copy.deepcopy(donor.config)
    if recipe.slices:
        total = len(layer_sources)
        old = donor.num_layers
        for key in LAYER_COUNT_KEYS:
            if key in config:
                config[key] = total
        for key, value in donor.config.items():
            if (
                isinstance(value, list)
                and old is not None
                and len(value) == old
                and key not in LAYER_COUNT_KEYS
            ):
                config[key] = [
                    _layer_config_value(sources, key, ref, index) for ref, index in layer_sources
                ]
    out = next((t.out_dtype for t in tasks if not t.copy_only), None)
    if out is not None:
        name = next(k for k, v in DTYPES.items() if v == out)
        config["torch_dtype" if "torch_dtype" in config or "dtype" not in config else "dtype"] = (
            name
        )
    return config


def _layer_config_value(
    sources: dict[ModelReference, ModelSource], key: str, ref: ModelReference, index: int
) -> Any:
    values = sources[ref].config.get(key)
    if not isinstance(values, list) or index >= len(values):
        raise IncompatibleModelsError(
            f"config.json of {ref} has no per-layer '{key}' entry for layer {index}, which the output config needs"
        )
    return values[index]
