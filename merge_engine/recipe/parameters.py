"""Resolving a parameter for one tensor: precedence (model > slice > global), filter lists
(first matching ``filter`` wins), gradients (a list of numbers interpolated over the layers of
a slice; position ``t`` in [0, 1], 0 for the embeddings and 1 for the final norm and head) and, for diffusion
models, block values (one value per UNet block)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from merge_engine.recipe.schema import BlockValues, ConditionalParameter, ParameterSetting, Scalar

Scope = tuple[str, dict[str, ParameterSetting] | None]
"""A level of parameters with the recipe path it came from, e.g. ("models[1].parameters", {...})."""


@dataclass(frozen=True)
class Place:
    """Where a tensor sits, as parameters see it. ``name`` is what a filter finds as a
    substring; ``t`` the position gradients interpolate at. A diffusion model's tensor also
    has ``labels`` that a filter names exactly (its block such as ``IN04``, its component
    such as ``vae``, its class such as ``attention``; ``vocabulary`` holds every label of
    the layout, and a filter that is one matches by label only, never as a substring) and
    ``block``, its index in the layout's block list, which picks its value from a block list."""

    name: str
    t: float = 0.0
    labels: frozenset[str] = frozenset()
    block: int | None = None
    vocabulary: frozenset[str] = frozenset()

    def matches(self, pattern: str | None) -> bool:
        if pattern in (None, "*") or pattern in self.labels:
            return True
        return pattern not in self.vocabulary and bool(self.name) and pattern in self.name


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def evaluate(setting: ParameterSetting, place: Place) -> Any:
    """The value of one setting for one tensor, or None if no filter matches."""
    if isinstance(setting, BlockValues):
        return setting.blocks[place.block] if place.block is not None else None
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(entry, ConditionalParameter) for entry in setting):
            for entry in setting:
                if place.matches(entry.filter):
                    return evaluate(entry.value, place)
            return None
        t = place.t
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        values = [float(v) for v in setting]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    return setting


def varies_by_tensor(name: str, scopes: Iterable[Scope]) -> bool:
    """Whether ``name`` may take another value on another tensor in ``scopes``: set anywhere as
    a gradient, a filter list or block values. When not, a value (or its absence) is one
    for the whole model, and a message about it has no tensor to name."""
    return any(
        parameters and name in parameters and not isinstance(parameters[name], Scalar)
        for _, parameters in scopes
    )


def resolve(name: str, scopes: Iterable[Scope], place: Place) -> tuple[Any, str] | None:
    """The first defined value of ``name`` in the scopes (highest precedence first), with its path."""
    for path, parameters in scopes:
        if parameters and name in parameters:
            value = evaluate(parameters[name], place)
            if value is not None:
                return value, f"{path}.{name}"
    return None
