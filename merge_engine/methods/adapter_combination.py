"""PEFT's ``add_weighted_adapter``, one module at a time, as pure tensor math.

Several LoRA adapters of one base become one adapter. Each function here repeats the
arithmetic of PEFT 0.22 (``peft/tuners/lora/model.py``: ``add_weighted_adapter``,
``_svd_generalized_task_arithmetic_weighted_adapter``,
``_generalized_task_arithmetic_weighted_adapter``; ``peft/utils/merge_utils.py``) operation
for operation, in the same order and dtypes, so that the factors are PEFT's to the bit:

- ``cat``: the factors side by side, each adapter's A scaled by weight × its scaling.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A's and B's are
  combined separately (each weighted by the square root of weight × scaling, the sign on A),
  which is why their ranks must be equal; an approximation of the weighted sum of the deltas.
- ``svd`` and the ``*_svd`` types: the deltas (B @ A × scaling) are combined, then the result
  is cut back to ``svd_rank`` by ``torch.linalg.svd`` (U × S becomes B, Vh becomes A), with
  PEFT's optional clamp of both at a quantile.

The random masks of the ``dare`` types come from ``generator``: a CPU generator seeded with
``s`` draws the same masks as PEFT after ``torch.manual_seed(s)`` when the modules are
visited in the model's module order (PEFT's loop), each module's draws in PEFT's order
(A's of every adapter, then B's; or one delta per adapter).

Only 2-D factors: ``nn.Linear`` (GPT-2's ``Conv1D`` with ``fan_in_fan_out``) and
``nn.Embedding`` (its A is ``(r, num_embeddings)``, its delta transposed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Combined factor by factor: every adapter must have the same rank (PEFT's rule)."""
SVD_TYPES = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t not in ("svd", "linear", "cat"))
"""The types that prune, and so read ``density``."""
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
"""The types that elect a sign, and so read ``majority_sign_method``."""
RANDOM_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith("dare"))
DESCRIPTIONS = {
    "svd": "the weighted sum of the adapters' updates, cut back to the rank by SVD",
    "linear": "A's and B's summed separately with the square roots of the weights (equal ranks); a rough approximation of the weighted sum of the updates",
    "cat": "the adapters' factors side by side: exactly the weighted sum of their updates, at the sum of their ranks",
    "ties": "TIES on A's and B's separately (equal ranks): each pruned to the density by magnitude, signs elected, agreeing entries averaged",
    "ties_svd": "TIES on the adapters' updates (pruned to the density by magnitude, signs elected, agreeing entries averaged), cut back to the rank by SVD",
    "dare_ties": "DARE then TIES on A's and B's separately (equal ranks): entries dropped at random to the density and rescaled, signs elected",
    "dare_linear": "DARE on A's and B's separately (equal ranks): entries dropped at random to the density and rescaled, then summed",
    "dare_ties_svd": "DARE then TIES on the adapters' updates, cut back to the rank by SVD",
    "dare_linear_svd": "DARE on the adapters' updates (dropped at random to the density, rescaled, summed), cut back to the rank by SVD",
    "magnitude_prune": "A's and B's (equal ranks) each pruned to the density by magnitude, then summed",
    "magnitude_prune_svd": "the adapters' updates each pruned to the density by magnitude, summed, cut back to the rank by SVD",
}
"""One line per combination type, for the card."""

ModuleKind = Literal["linear", "embedding"]


@dataclass(frozen=True)
class Combination:
    """How adapters are combined: PEFT's ``combination_type`` and its keyword arguments."""

    type: str
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None

    def new_rank(self, ranks: Sequence[int]) -> int:
        """The combined adapter's rank from its sources' (each the largest of its modules'),
        as PEFT's ``_check_add_weighted_adapter`` sets it (ranks already checked equal for
        the factor types)."""
        if self.type == "cat":
            return sum(ranks)
        if self.type in SVD_TYPES:
            return self.svd_rank or max(ranks)
        return ranks[0]


@dataclass(frozen=True)
class Factors:
    """One adapter's factors of one module: ``down`` (A) and ``up`` (B) as saved, and its
    scaling (lora_alpha / r, or / sqrt(r) for rsLoRA, per module)."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


def combine_module(
    combination: Combination,
    factors: Sequence[Factors],
    weights: Sequence[float],
    new_rank: int,
    *,
    kind: ModuleKind = "linear",
    fan_in_fan_out: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (down, up) of one module from the adapters that target it (``weights``
    theirs, in recipe order). The new adapter's scaling is 1 (``lora_alpha == r``)."""
    if not factors:
        raise ValueError("combine_module needs the factors of at least one adapter")
    if combination.type == "cat":
        return _cat(factors, weights, new_rank)
    if combination.type in SVD_TYPES:
        return _svd(combination, factors, weights, new_rank, kind, fan_in_fan_out, generator)
    if combination.type in FACTOR_TYPES:
        return _by_factor(combination, factors, weights, generator)
    raise ValueError(f"unknown combination type {combination.type!r}")


def _cat(
    factors: Sequence[Factors], weights: Sequence[float], new_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    downs = torch.cat(
        [f.down * w * f.scaling for f, w in zip(factors, weights, strict=True)], dim=0
    )
    ups = torch.cat([f.up for f in factors], dim=1)
    # PEFT fills a zeroed adapter of the full rank from the top: a module that fewer adapters
    # target keeps zero rows (A) and columns (B) at the end.
    down = torch.zeros((new_rank, *downs.shape[1:]), dtype=factors[0].down.dtype)
    up = torch.zeros((ups.shape[0], new_rank, *ups.shape[2:]), dtype=factors[0].up.dtype)
    down[: downs.shape[0]] = downs
    up[:, : ups.shape[1]] = ups
    return down, up


def _by_factor(
    combination: Combination,
    factors: Sequence[Factors],
    weights: Sequence[float],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights_down, weights_up = [], []
    for f, weight in zip(factors, weights, strict=True):
        weighted = weight * f.scaling
        sign = 1 if weighted >= 0 else -1  # the sign on one side only, or it cancels
        weights_down.append(math.sqrt(abs(weighted)) * sign)
        weights_up.append(math.sqrt(abs(weighted)))
    dtype = factors[0].down.dtype
    down = _merge(combination, [f.down for f in factors], torch.tensor(weights_down), generator)
    up = _merge(combination, [f.up for f in factors], torch.tensor(weights_up), generator)
    return down.to(dtype), up.to(dtype)


def delta_weight(factors: Factors, kind: ModuleKind, fan_in_fan_out: bool) -> torch.Tensor:
    """The module's update as PEFT's ``get_delta_weight`` computes it: B @ A times the
    scaling, in float32 for half-precision factors (PEFT on a CPU), laid out as the weight."""
    dtype = factors.down.dtype if kind == "embedding" else factors.up.dtype
    down, up = factors.down, factors.up
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        down, up = down.float(), up.float()
    delta = up @ down
    if fan_in_fan_out or kind == "embedding":
        delta = delta.T
    delta.mul_(factors.scaling)
    return delta.to(dtype) if half else delta


def _svd(
    combination: Combination,
    factors: Sequence[Factors],
    weights: Sequence[float],
    new_rank: int,
    kind: ModuleKind,
    fan_in_fan_out: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [delta_weight(f, kind, fan_in_fan_out) for f in factors]
    base_type = combination.type.removesuffix("_svd")
    base_type = "linear" if base_type == "svd" else base_type
    merged = _merge(
        Combination(base_type, combination.density, combination.majority_sign_method),
        deltas,
        torch.tensor(list(weights)),
        generator,
    )
    if fan_in_fan_out or kind == "embedding":
        merged = merged.T
    u, s, vh = torch.linalg.svd(
        merged, full_matrices=combination.svd_full_matrices, driver=combination.svd_driver
    )
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if combination.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), combination.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def draw_initial_weights(
    generator: torch.Generator,
    modules: Sequence[tuple[ModuleKind, int, int]],
    rank: int,
    init_lora_weights: bool | str = True,
) -> None:
    """Advances ``generator`` past the draws PEFT makes from the global RNG while it creates
    the combined adapter, before any mask: per module of the new adapter, in module order,
    ``(kind, in_features, out_features)`` (an embedding's ``in_features`` is its vocabulary),
    the layers' own initialisation and then ``reset_lora_parameters`` with the first
    adapter's ``init_lora_weights`` (True, ``"gaussian"`` or False; other inits are not
    replayed: the plan says so)."""
    for kind, in_features, out_features in modules:
        if kind == "embedding":  # update_layer: randn A and B; reset: A zeros, B normal
            torch.randn((rank, in_features), generator=generator)
            torch.randn((out_features, rank), generator=generator)
            if init_lora_weights is not False:
                torch.empty(out_features, rank).normal_(generator=generator)
            continue
        # nn.Linear(in, r) and nn.Linear(r, out) initialise their weights (kaiming uniform)
        torch.empty(rank, in_features).uniform_(generator=generator)
        torch.empty(out_features, rank).uniform_(generator=generator)
        if init_lora_weights is True:
            torch.empty(rank, in_features).uniform_(generator=generator)
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            torch.empty(rank, in_features).normal_(generator=generator)


REPLAYED_INITS = (True, False, "gaussian")
"""The ``init_lora_weights`` whose draws :func:`draw_initial_weights` replays."""


# --- peft/utils/merge_utils.py, with the random masks drawn from a given generator --------


def _merge(
    combination: Combination,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    kind, density, sign_method = (
        combination.type,
        combination.density,
        combination.majority_sign_method,
    )
    if kind in ("magnitude_prune", "ties"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if kind in ("ties", "dare_ties"):
        mask = _majority_sign_mask(stacked, sign_method)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the ``density`` share of largest magnitudes; 1 or more keeps everything."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keeps each entry with probability ``density`` and rescales by 1 / density; 1 or
    more keeps everything and draws nothing (PEFT's ``prune``)."""
    if density >= 1:
        return tensor
    return tensor * _mask(tensor, density, generator) / density


def _mask(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's draw: Bernoulli(density) in ``tensor``'s shape, dtype and layout."""
    return torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)


def draw_masks(
    combination: Combination,
    shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    dtype: torch.dtype,
    *,
    kind: ModuleKind = "linear",
    fan_in_fan_out: bool = False,
    generator: torch.Generator,
) -> None:
    """Advances ``generator`` by exactly the draws :func:`combine_module` makes for one module
    whose adapters' factors have these (down, up) shapes, without reading or computing them:
    so a module's masks can be drawn out of PEFT's order from the state recorded for it."""
    density = combination.density
    if combination.type not in RANDOM_TYPES or density is None or density >= 1:
        return
    if combination.type in SVD_TYPES:  # one mask per adapter's delta, laid out as PEFT's
        for down, up in shapes:
            delta = torch.empty(up[0], down[1], dtype=dtype)
            _mask(delta.T if fan_in_fan_out or kind == "embedding" else delta, density, generator)
        return
    for side in (0, 1):  # every adapter's A, then every adapter's B
        for pair in shapes:
            _mask(torch.empty(pair[side], dtype=dtype), density, generator)


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)
