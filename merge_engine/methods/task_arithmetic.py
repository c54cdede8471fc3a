"""Generalized task arithmetic: eight mergekit methods, one implementation configured by data.

For each input, the task vector δᵢ = θᵢ − θ₀ is (1) sparsified with its density, (2) weighted,
Dᵢ = wᵢ·δᵢ, (3) optionally filtered by sign consensus (keep Dᵢ where its sign matches
sign(ΣDⱼ)), (4) summed and optionally normalised by the sum of the weights that took part,
(5) scaled by ``lambda`` and added back to the base. See docs/methods.md; the per-entry steps
(2)–(5) are :mod:`merge_engine.methods.task_vector_sum`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from merge_engine.methods import sparsify, task_vector_sum
from merge_engine.methods.registry import REQUIRED, MergeMethod, Param, register


@dataclass(frozen=True)
class TaskArithmeticVariant:
    name: str
    pretty_name: str
    paper: str
    doc: str
    sparsifier: str | None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: bool
    default_normalize: bool
    default_rescale: bool

    def params(self) -> tuple[Param, ...]:
        params = [
            Param(
                "weight",
                float,
                REQUIRED,
                "per_model",
                "scale of this model's task vector; negative subtracts it (negation)",
            ),
            Param(
                "density",
                float,
                1.0,
                "per_model",
                "fraction of the task vector kept",
                low=0,
                high=1,
                low_open=True,
            ),
            Param(
                "normalize",
                bool,
                self.default_normalize,
                doc="divide by the sum of the weights that took part",
            ),
            Param(
                "rescale",
                bool,
                self.default_rescale,
                doc="rescale kept entries so the task vector keeps its L1 norm",
            ),
            Param("lambda", float, 1.0, doc="scale of the merged task vector"),
            Param(
                "int8_mask",
                bool,
                False,
                doc="accepted for mergekit compatibility; masks are always compact here",
            ),
        ]
        if self.sparsifier == "magnitude_outliers":
            params.append(
                Param(
                    "gamma",
                    float,
                    0.01,
                    "per_model",
                    "fraction of the largest entries dropped as outliers",
                    low=0,
                    high=1,
                    high_open=True,
                )
            )
        if self.sparsifier == "della_magprune":
            params.append(
                Param(
                    "epsilon",
                    float,
                    0.15,
                    "per_model",
                    "half-width of the keep-probability band around density",
                    low=0,
                    high=1,
                    high_open=True,
                )
            )
        if self.sparsifier in ("random", "della_magprune"):
            params.append(
                Param(
                    "rescale_mode",
                    str,
                    "l1",
                    doc="l1: match the L1 norm (mergekit); inverse_density: divide by the keep probability (the paper)",
                    choices=("l1", "inverse_density"),
                )
            )
        return tuple(params)


def make_kernel(variant: TaskArithmeticVariant) -> Callable[..., torch.Tensor]:
    def kernel(
        tensors: list[torch.Tensor],
        base: torch.Tensor,
        *,
        weight: list[float],
        density: list[float],
        normalize: bool,
        rescale: bool,
        lambda_: float,
        int8_mask: bool,
        gamma: list[float] | None = None,
        epsilon: list[float] | None = None,
        rescale_mode: sparsify.RescaleMode = "l1",
        generator: torch.Generator | None = None,
        magnitude_orders: list[sparsify.MagnitudeOrder] | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        mode = rescale_mode if rescale else None

        orders = magnitude_orders or [None] * len(tensors)

        def sparsified(i: int, delta: torch.Tensor) -> torch.Tensor:
            if variant.sparsifier == "random":
                return sparsify.bernoulli(delta, density[i], mode, generator)
            if variant.sparsifier == "della_magprune":
                return sparsify.della_magprune(delta, density[i], epsilon[i], mode, generator)
            if variant.sparsifier == "magnitude":
                pruned = sparsify.magnitude(delta, density[i], orders[i])
            else:
                pruned = sparsify.magnitude_outliers(delta, density[i], gamma[i])
            return sparsify.match_l1(pruned, delta) if mode and density[i] < 1 else pruned

        by_threshold = variant.sparsifier is None or (
            variant.sparsifier == "magnitude" and not (mode and min(density) < 1)
        )
        if by_threshold:  # pruning is a rule per entry: the whole merge is one pass
            thresholds = [
                sparsify.magnitude_threshold(lambda t=tensor: t - base, base.numel(), d, order)
                if variant.sparsifier
                else None
                for tensor, d, order in zip(tensors, density, orders, strict=True)
            ]
            inputs = tensors
        else:  # a random or rescaled sparsifier reads each whole task vector first
            inputs = [sparsified(i, tensor - base) for i, tensor in enumerate(tensors)]
            thresholds = [None] * len(tensors)
        return task_vector_sum.merged_tensor(
            inputs,
            base,
            thresholds,
            weight,
            subtract_base=by_threshold,
            consensus=variant.consensus,
            normalize=normalize,
            lambda_=lambda_,
            compiled=compiled,
        )

    return kernel


def _density_epsilon_check(p: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    for values in per_model:
        d, eps = values["density"], values["epsilon"]
        if d < 1 and not (d - eps > 0 and d + eps < 1):
            return f"density {d:g} ± epsilon {eps:g} must stay inside (0, 1); lower epsilon or move density away from the edge"
    return None


VARIANTS = (
    TaskArithmeticVariant(
        "task_arithmetic",
        "Task Arithmetic",
        "https://arxiv.org/abs/2212.04089",
        "add weighted task vectors to the base; negative weights subtract (negation)",
        None,
        False,
        False,
        False,
    ),
    TaskArithmeticVariant(
        "ties",
        "TIES",
        "https://arxiv.org/abs/2306.01708",
        "trim to top-k magnitude, elect a sign per entry, average the agreeing task vectors",
        "magnitude",
        True,
        True,
        False,
    ),
    TaskArithmeticVariant(
        "dare_ties",
        "DARE TIES",
        "https://arxiv.org/abs/2311.03099",
        "drop task-vector entries at random and rescale, then TIES sign consensus",
        "random",
        True,
        False,
        True,
    ),
    TaskArithmeticVariant(
        "dare_linear",
        "Linear DARE",
        "https://arxiv.org/abs/2311.03099",
        "drop task-vector entries at random and rescale, then add them up",
        "random",
        False,
        False,
        True,
    ),
    TaskArithmeticVariant(
        "breadcrumbs",
        "Model Breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
        "drop the largest outliers and the smallest entries of each task vector, then add",
        "magnitude_outliers",
        False,
        False,
        False,
    ),
    TaskArithmeticVariant(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "https://arxiv.org/abs/2312.06795",
        "breadcrumbs pruning followed by TIES sign consensus",
        "magnitude_outliers",
        True,
        False,
        False,
    ),
    TaskArithmeticVariant(
        "della",
        "DELLA",
        "https://arxiv.org/abs/2406.11617",
        "magnitude-ranked random pruning (MagPrune), rescale, then TIES sign consensus",
        "della_magprune",
        True,
        True,
        True,
    ),
    TaskArithmeticVariant(
        "della_linear",
        "Linear DELLA",
        "https://arxiv.org/abs/2406.11617",
        "magnitude-ranked random pruning (MagPrune), rescale, then add",
        "della_magprune",
        False,
        False,
        True,
    ),
)

for _variant in VARIANTS:
    register(
        MergeMethod(
            name=_variant.name,
            pretty_name=_variant.pretty_name,
            doc=_variant.doc,
            paper=_variant.paper,
            kernel=make_kernel(_variant),
            params=_variant.params(),
            base="required",
            random=_variant.sparsifier in ("random", "della_magprune"),
            prunes_by_magnitude=_variant.sparsifier == "magnitude",
            compiles=True,
            check=_density_epsilon_check if _variant.sparsifier == "della_magprune" else None,
        )
    )
