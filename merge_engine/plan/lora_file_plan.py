"""The pre-flight of Stable Diffusion LoRA files merged into one LoRA file (``output: adapter``
with an SD1.5/SDXL ``base_model``): each file read from its header and matched to the base
checkpoint module by module (:func:`merge_engine.sources.baked_loras.bake_lora`), the output's
modules and shapes decided. How they are combined is :mod:`merge_engine.run.lora_merge`.

The recipe is the adapter output's (:mod:`merge_engine.plan.adapter_recipe`), as PEFT names
the two combinations SD tools have: ``cat`` (sd-scripts' ``merge_lora.py --concat``) and
``svd`` (``svd_merge_lora.py``, at ``svd_rank``; the largest input rank when not given, as
PEFT's)::

    output: adapter
    merge_method: cat
    base_model: org/sd15-checkpoint
    models:
      - model: org/style-lora
        parameters: {weight: 0.8}
      - model: ./detail.safetensors
        parameters: {weight: 0.5}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Literal

import torch

from merge_engine.errors import RecipeError
from merge_engine.methods.low_rank import check_rank_value, max_rank
from merge_engine.plan.merge_plan import PlannedModule
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.baked_loras import BakedLora, bake_lora
from merge_engine.sources.formats.kohya_lora import LoraTarget
from merge_engine.sources.inspection import ModelSource

Combination = Literal["cat", "svd"]
COMBINATIONS: tuple[Combination, ...] = ("cat", "svd")


@dataclass(frozen=True)
class LoraPart:
    """One LoRA file's module that an output module sums, at the file's weight."""

    lora: BakedLora
    target: LoraTarget
    strength: float


@dataclass(frozen=True)
class MergedModule:
    planned: PlannedModule
    parts: tuple[LoraPart, ...]
    weight_shape: tuple[int, ...]


@dataclass
class LoraFilePlan:
    """What merging SD LoRA files computes and writes; made by :func:`build_lora_file_plan`."""

    recipe: Recipe | None
    base: ModelSource
    loras: list[ModelSource]
    weights: list[float]
    combination: Combination
    modules: list[MergedModule]
    random = False

    @property
    def sources(self) -> dict[ModelReference, ModelSource]:
        """The LoRA files by reference: what the merge downloads (the base is never read)."""
        return {lora.ref: lora for lora in self.loras}

    def revisions(self) -> dict[ModelReference, str]:
        found = {lora.ref: lora.revision for lora in self.loras if lora.revision}
        if self.base.revision:
            found[self.base.ref] = self.base.revision
        return found

    @property
    def output_bytes(self) -> int:
        dtype = self.dtype
        return sum(
            (m.planned.rank * (m.weight_shape[0] + prod(m.weight_shape[1:])) + 1) * dtype.itemsize
            for m in self.modules
        )

    @property
    def dtype(self) -> torch.dtype:
        """The first LoRA file's dtype, which the merged file is written in."""
        return next(iter(self.loras[0].tensors.values())).dtype

    def describe_models(self) -> str:
        count = len(self.loras)
        return f"{count} LoRA file{'s' if count != 1 else ''} of {self.base.ref}"

    def summary(self) -> list[str]:
        ranks = sorted({m.planned.rank for m in self.modules})
        lines = [
            f"ok: {self.combination} of {self.describe_models()} into one kohya LoRA of rank "
            f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]} to {ranks[-1]}'}, "
            f"{len(self.modules)} modules, {self.output_bytes / 1e6:.1f} MB"
        ]
        lines.append(
            f"  {self.base.ref} (base): {self.base.revision or self.base.ref.local_kind()}"
        )
        for lora, weight in zip(self.loras, self.weights, strict=True):
            lines.append(
                f"  {lora.ref}: weight {weight:g}, {lora.revision or lora.ref.local_kind()}"
            )
        return lines

    def pinned_recipe(self) -> Recipe | None:
        return self.recipe.with_revisions(self.revisions()) if self.recipe else None

    def reproducible_recipe(self) -> Recipe | None:
        return self.pinned_recipe()


def build_lora_file_plan(
    base: ModelSource,
    loras: Sequence[ModelSource],
    weights: Sequence[float],
    combination: str = "cat",
    rank: int | None = None,
    recipe: Recipe | None = None,
    clamp: float | None = None,
) -> LoraFilePlan:
    """Each output module and the LoRA modules it sums, from headers alone; a file that is no
    LoRA for ``base`` is refused here, as a combination other than cat or svd, or a rank below
    1 (``svd`` clamps it per module to what the module can hold). ``clamp`` (PEFT's
    ``svd_clamp``) is refused: the SD svd merge keeps the exact truncated SVD."""
    if combination not in COMBINATIONS:
        raise RecipeError(
            f"{combination} is not a way mergebot merges SD LoRA files; use cat (their exact "
            "sum) or svd (its truncated SVD at svd_rank)",
            "merge_method",
        )
    if clamp is not None:
        raise RecipeError(
            "clips the factors' values, which mergebot's svd merge of SD LoRA files does not "
            "(it keeps the exact truncated SVD); remove it",
            "parameters.svd_clamp",
        )
    groups: dict[str, list[LoraPart]] = defaultdict(list)
    ranks = []
    for source, weight in zip(loras, weights, strict=True):
        baked = bake_lora(base, source, weight)
        ranks += [t.module.rank for t in baked.targets]
        for target, strength in zip(baked.targets, baked.strengths, strict=True):
            groups[target.kohya_name].append(LoraPart(baked, target, strength))
    if combination == "svd":
        rank = rank if rank is not None else max(ranks)
        check_rank_value(rank)
    modules = []
    for name in sorted(groups):
        parts = groups[name]
        shape = parts[0].target.module.weight_shape()
        trailing = (1,) * (len(shape) - 2)
        if combination == "cat":
            r = sum(p.target.module.rank for p in parts)
        else:
            assert rank is not None
            r = min(rank, max_rank(shape))
        planned = PlannedModule(name, (r, *shape[1:]), (shape[0], r, *trailing))
        modules.append(MergedModule(planned, tuple(parts), shape))
    return LoraFilePlan(recipe, base, list(loras), list(weights), combination, modules)  # type: ignore[arg-type]
