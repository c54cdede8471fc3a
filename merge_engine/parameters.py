"""Resolving a parameter for one tensor: precedence (model > slice > global), filter lists
(first matching ``filter`` substring wins) and gradients (a list of numbers interpolated over
the layers of a slice; position ``t`` in [0, 1], 0 for tensors outside the layers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from merge_engine.recipe import ConditionalParameter, ParameterSetting

Scope = tuple[str, dict[str, ParameterSetting] | None]
"""A level of parameters with the recipe path it came from, e.g. ("models[1].parameters", {...})."""


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


def evaluate(setting: ParameterSetting, tensor: str, t: float) -> Any:
    """The value of one setting for one tensor at layer position t, or None if no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(entry, ConditionalParameter) for entry in setting):
            for entry in setting:
                if entry.filter in (None, "*") or (tensor and entry.filter in tensor):
                    return evaluate(entry.value, tensor, t)
            return None
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        values = [float(v) for v in setting]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    return setting


def resolve(name: str, scopes: Iterable[Scope], tensor: str, t: float) -> tuple[Any, str] | None:
    """The first defined value of ``name`` in the scopes (highest precedence first), with its path."""
    for path, parameters in scopes:
        if parameters and name in parameters:
            value = evaluate(parameters[name], tensor, t)
            if value is not None:
                return value, f"{path}.{name}"
    return None
