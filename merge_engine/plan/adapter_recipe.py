"""What a recipe with ``output: adapter`` asks for: PEFT's combination type and its arguments.

The recipe speaks PEFT's ``add_weighted_adapter`` in mergekit's shape, so that a PEFT user
finds every name they pass::

    output: adapter
    merge_method: ties_svd          # combination_type
    base_model: org/base
    models:
      - model: org/adapter-a
        parameters: {weight: 0.7}   # weights, one per adapter (default 1)
      - model: org/adapter-b
        parameters: {weight: 0.3}
    parameters: {density: 0.5, majority_sign_method: total, svd_rank: 16, svd_clamp: 0.99,
                 svd_full_matrices: true}
    random_seed: 0                  # the torch seed PEFT's dare masks are drawn with

This module checks the recipe alone (no file is read): which fields an adapter output has,
each parameter's type and range, and which combination types read it. What needs the
adapters (their ranks, modules and the base's shapes) is checked in
:mod:`merge_engine.plan.adapter_plan`.
"""

from __future__ import annotations

import math
from typing import Any

from merge_engine.errors import RecipeError, excerpt
from merge_engine.methods.adapter_combination import (
    COMBINATION_TYPES,
    DENSITY_TYPES,
    SIGN_TYPES,
    SVD_TYPES,
    Combination,
)
from merge_engine.recipe.schema import Recipe

SHARED_PARAMETERS = {
    "density": DENSITY_TYPES,
    "majority_sign_method": SIGN_TYPES,
    "svd_rank": SVD_TYPES,
    "svd_clamp": SVD_TYPES,
    "svd_full_matrices": SVD_TYPES,
    "svd_driver": SVD_TYPES,
}
"""The top-level parameters of an adapter output and the combination types that read each."""
UNUSED_FIELDS = (
    "slices",
    "tokenizer_source",
    "calibration",
    "align",
    "vae",
    "discard",
    "output_layout",
    "dtype",
    "out_dtype",
)
"""Recipe fields that shape a merged model and mean nothing for an adapter."""


def is_adapter_output(recipe: Recipe) -> bool:
    return recipe.output == "adapter"


def read_combination(recipe: Recipe) -> tuple[Combination, list[float]]:
    """The combination and one weight per model, or a :class:`RecipeError` naming the field."""
    for name in UNUSED_FIELDS:
        if getattr(recipe, name) is not None:
            raise RecipeError(
                "is not used when the output is an adapter (output: adapter combines LoRA adapters into one); remove it",
                field=name,
            )
    for i, entry in enumerate(recipe.models):
        if entry.calibration is not None:
            raise RecipeError(
                "is not used when the output is an adapter (adapters are combined without data); remove it",
                field=f"models[{i}].calibration",
            )
    if recipe.base_model is None:
        raise RecipeError(
            "an adapter output needs the base model its adapters were trained on; name it in base_model",
            field="base_model",
        )
    composite = [("base_model", recipe.base_model)] + [
        (f"models[{i}].model", entry.model) for i, entry in enumerate(recipe.models)
    ]
    for where, ref in composite:
        if ref.adapter is not None:
            raise RecipeError(
                f"{excerpt(str(ref))} applies an adapter ('+'), but an adapter output combines "
                "adapters of one base: name each adapter alone under models and the base in base_model",
                field=where,
            )
    kind = recipe.merge_method
    if kind not in COMBINATION_TYPES:
        raise RecipeError(
            f"{excerpt(kind)} is not one of PEFT's combination types for an adapter output; "
            f"use one of {', '.join(COMBINATION_TYPES)}",
            field="merge_method",
        )
    weights = [_weight(entry.parameters, f"models[{i}]") for i, entry in enumerate(recipe.models)]
    shared = dict(recipe.parameters or {})
    for name in shared:
        if name == "weight":
            raise RecipeError(
                "an adapter output has one weight per adapter, as PEFT's weights list; move it to each model's parameters",
                field="parameters.weight",
            )
        if name not in SHARED_PARAMETERS:
            raise RecipeError(
                f"{excerpt(name)} is not a parameter of an adapter output; use "
                f"{', '.join(SHARED_PARAMETERS)} (and weight per model)",
                field=f"parameters.{excerpt(name)}",
            )
        if kind not in SHARED_PARAMETERS[name]:
            raise RecipeError(
                f"{kind} does not read {name} (only {', '.join(SHARED_PARAMETERS[name])} do); remove it",
                field=f"parameters.{name}",
            )
    if kind in DENSITY_TYPES and "density" not in shared:
        raise RecipeError(
            f"{kind} prunes each adapter to a density; give it as a number above 0 and at most 1 (density: 0.5 keeps half of each)",
            field="parameters.density",
        )
    combination = Combination(
        kind,
        density=_number(shared, "density", low=0.0, high=1.0, low_open=True),
        majority_sign_method=_choice(shared, "majority_sign_method", ("total", "frequency"))
        or "total",
        svd_rank=_rank(shared),
        svd_clamp=_number(shared, "svd_clamp", low=0.0, high=1.0),
        svd_full_matrices=_flag(shared, "svd_full_matrices"),
        svd_driver=_driver(shared),
    )
    return combination, weights


def _weight(parameters: dict[str, Any] | None, where: str) -> float:
    for name in parameters or {}:
        if name != "weight":
            raise RecipeError(
                f"an adapter output takes only a weight per adapter; move {excerpt(name)} to the top-level parameters or remove it",
                field=f"{where}.parameters.{excerpt(name)}",
            )
    value = (parameters or {}).get("weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecipeError(
            f"must be one finite number (PEFT's weight for this adapter; negative subtracts it), got {excerpt(value)}",
            field=f"{where}.parameters.weight",
        )
    return float(value)


def _number(
    shared: dict[str, Any], name: str, low: float, high: float, low_open: bool = False
) -> float | None:
    if name not in shared:
        return None
    value = shared[name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    above = number and (value > low if low_open else value >= low)
    if not (number and above and value <= high):
        bound = "above" if low_open else "at least"
        raise RecipeError(
            f"must be one number {bound} {low:g} and at most {high:g}, got {excerpt(value)}",
            field=f"parameters.{name}",
        )
    return float(value)


def _rank(shared: dict[str, Any]) -> int | None:
    value = shared.get("svd_rank")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(
            f"must be a whole number of at least 1 (the combined adapter's rank), got {excerpt(value)}",
            field="parameters.svd_rank",
        )
    return value


def _flag(shared: dict[str, Any], name: str) -> bool:
    value = shared.get(name, True)
    if not isinstance(value, bool):
        raise RecipeError(
            f"must be true or false, got {excerpt(value)}", field=f"parameters.{name}"
        )
    return value


def _choice(shared: dict[str, Any], name: str, choices: tuple[str, ...]) -> str | None:
    value = shared.get(name)
    if value is not None and value not in choices:
        raise RecipeError(
            f"must be one of {', '.join(choices)}, got {excerpt(value)}", field=f"parameters.{name}"
        )
    return value


def _driver(shared: dict[str, Any]) -> None:
    if "svd_driver" in shared:
        raise RecipeError(
            "picks a cuSOLVER routine, which torch runs only on CUDA, and mergebot combines "
            "adapters on the CPU (where PEFT's dare masks are drawn); remove it",
            field="parameters.svd_driver",
        )
