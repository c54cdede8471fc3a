"""The method registry: one entry per merge method, the single source that the recipe
validator, ``mergebot methods``, the model card and (later) the Space form all read.

A method is a pure tensor function plus the facts about it declared here. The kernel is
called as ``kernel(tensors, base, **parameters)`` where ``tensors`` are the inputs (the base
excluded), ``base`` is the base tensor or ``None``, per-model parameters arrive as lists
aligned with ``tensors`` and global parameters as scalars; a random method also receives
``generator``, a method that needs data ``stats``. Registration checks the kernel's signature
against the declared parameters, so a mismatch fails at import, not mid-merge.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from merge_engine.errors import RecipeError, excerpt

REQUIRED: Any = object()

Scope = Literal["global", "per_model"]
BasePolicy = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class Param:
    """A declared parameter. ``low``/``high`` bound the value; ``*_open`` excludes the bound."""

    name: str
    type: type
    default: Any = REQUIRED
    scope: Scope = "global"
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def bounds_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"

    def coerce(self, value: Any, where: str) -> Any:
        """Convert a resolved value to the declared type and check its bounds."""
        if self.choices:
            if value not in self.choices:
                raise RecipeError(
                    f"must be one of {', '.join(self.choices)}, got {excerpt(value)}", field=where
                )
            return value
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, int) and value in (0, 1):  # YAML 0/1, as pydantic accepts
                return bool(value)
            raise RecipeError(f"must be true or false, got {excerpt(value)}", field=where)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"must be a number, got {excerpt(value)}", field=where)
        try:
            number = (
                round(float(value)) if self.type is int else self.type(value)
            )  # gradients interpolate
        except ValueError:
            raise RecipeError(f"must be a number, got {excerpt(value)}", field=where) from None
        if isinstance(number, float) and not math.isfinite(number):
            raise RecipeError(f"must be a finite number, got {excerpt(value)}", field=where)
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if too_low or too_high:
            raise RecipeError(
                f"{number:g} is out of range; {self.name} must lie in {self.bounds_text()}",
                field=where,
            )
        return number


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    doc: str
    paper: str | None
    kernel: Callable[..., torch.Tensor]
    params: tuple[Param, ...] = ()
    base: BasePolicy = "unused"
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    statistic: Callable[[dict[str, Any]], str] | None = field(default=None, repr=False)
    """For methods that need data: which statistic a tensor reads (``gram``,
    ``fisher_empirical``, ``fisher_exact``), from its global parameter values. The kernel then
    receives ``stats``: one :class:`~merge_engine.data.stats.Statistic` per input, or None."""
    layer_stacking: bool = False
    prunes_by_magnitude: bool = False
    """The kernel takes ``magnitude_orders``, one :class:`~merge_engine.methods.sparsify.MagnitudeOrder`
    per input, which a series of merges of the same sources keeps from one merge to the next."""
    compiles: bool = False
    """The kernel takes ``compiled``: run its per-entry arithmetic compiled into one loop
    (``torch.compile``), with the same bits as eager; worth its seconds of compiling only in a
    series of merges (a search's candidates)."""
    check: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = field(
        default=None, repr=False
    )
    """Cross-parameter rule on one tensor's resolved values; returns the error sentence or None."""

    @property
    def needs_data(self) -> bool:
        return self.statistic is not None

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "per_model")


_METHODS: dict[str, MergeMethod] = {}


def kernel_argument(name: str) -> str:
    """The keyword a kernel receives a parameter under (``lambda`` is a Python keyword)."""
    return "lambda_" if name == "lambda" else name


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    declared = (
        {kernel_argument(p.name) for p in method.params}
        | ({"generator"} if method.random else set())
        | ({"stats"} if method.needs_data else set())
    )
    signature = inspect.signature(method.kernel).parameters
    accepted = set(signature) - {"tensors", "base"}
    without_default = {n for n in accepted if signature[n].default is inspect.Parameter.empty}
    if (
        list(signature)[:2] != ["tensors", "base"]
        or not declared <= accepted
        or not without_default <= declared
    ):
        raise TypeError(
            f"kernel of {method.name} must take (tensors, base, *, ...) accepting {sorted(declared)}; "
            f"it takes {list(signature)}"
        )
    _METHODS[method.name] = method
    return method


def closest_method(name: str) -> str | None:
    """The registered method whose name is closest to a misspelt ``name``, if one is close."""
    return next(iter(difflib.get_close_matches(name, _METHODS, n=1)), None)


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        close = closest_method(name)
        hint = f"did you mean '{close}'?" if close else "run 'mergebot methods' for the list"
        raise RecipeError(f"unknown merge method '{name}'; {hint}", field="merge_method") from None


def all_methods() -> list[MergeMethod]:
    return list(_METHODS.values())
