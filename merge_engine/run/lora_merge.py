"""Several Stable Diffusion LoRAs of one checkpoint merged into one kohya-format LoRA file, as
sd-scripts' ``merge_lora.py --concat`` and ``svd_merge_lora.py`` do, and as PEFT names the two
combinations (``cat``, ``svd``):

* ``cat``: each module's factors stacked, ``down = [down_1; down_2; …]`` and
  ``up = [w_1 s_1 up_1, w_2 s_2 up_2, …]`` (``s_i = alpha_i / r_i``, ``w_i`` the LoRA's weight):
  ``up @ down`` is exactly ``Σ w_i s_i up_i @ down_i``, whatever the ranks
  (sd-scripts scales by square roots and keeps the first file's alpha; the product is the same
  sum only when the ranks and alphas agree, so mergebot computes the sum itself).
* ``svd``: the same sum as a full delta, then its truncated SVD at ``rank`` (clamped to what
  each module can hold), singular values on the up factor as sd-scripts puts them. sd-scripts also clips the factors' values at their 99th percentile; mergebot does not,
  so the file holds the best rank-r approximation (Eckart–Young), nothing else.

Modules are matched through the checkpoint (:func:`merge_engine.sources.baked_loras.bake_lora`),
so kohya, LDM-named and diffusers files of one family merge together; the output names every
module as sd-scripts does for the family. One module is in memory at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from merge_engine.errors import RecipeError
from merge_engine.methods.low_rank import check_rank_value, factor, max_rank
from merge_engine.output.kohya_lora import PlannedModule, write_kohya_lora
from merge_engine.sources.baked_loras import BakedLora, bake_lora
from merge_engine.sources.formats.kohya_lora import LoraTarget
from merge_engine.sources.inspection import ModelSource, download
from merge_engine.sources.low_rank import LowRankDelta

Combination = Literal["cat", "svd"]
COMBINATIONS: tuple[Combination, ...] = ("cat", "svd")


@dataclass(frozen=True)
class _Part:
    lora: BakedLora
    target: LoraTarget
    strength: float


@dataclass(frozen=True)
class MergedModule:
    planned: PlannedModule
    parts: tuple[_Part, ...]
    weight_shape: tuple[int, ...]


def plan_lora_merge(
    model: ModelSource,
    loras: Sequence[tuple[ModelSource, float]],
    combination: Combination = "cat",
    rank: int | None = None,
) -> list[MergedModule]:
    """Each output module and the LoRA modules it sums, from headers alone; a LoRA that does
    not fit ``model`` is refused here, as a rank below 1 or a missing one for ``svd``."""
    if combination not in COMBINATIONS:
        raise RecipeError(
            f"{combination!r} is not a way to merge SD LoRAs; use cat or svd", "merge_method"
        )
    if combination == "svd" and rank is None:
        raise RecipeError("svd merges LoRAs at a rank; give it (svd_rank)", "svd_rank")
    if rank is not None:
        check_rank_value(rank)  # each module clamps it to what it can hold
    groups: dict[str, list[_Part]] = defaultdict(list)
    for source, weight in loras:
        baked = bake_lora(model, source, weight)
        for target, strength in zip(baked.targets, baked.strengths, strict=True):
            groups[target.kohya_name].append(_Part(baked, target, strength))
    merged = []
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
        merged.append(MergedModule(planned, tuple(parts), shape))
    return merged


def _scale(part: _Part) -> float:
    """``strength * alpha / r`` of one LoRA module (alpha read from its file)."""
    module = part.target.module
    store = part.lora.source.store()
    alpha = float(store.get(module.alpha).item()) if module.alpha else module.rank
    return part.strength * alpha / module.rank


def _product_factors(
    merged: MergedModule, combination: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) whose product is the module's summed delta (``cat``) or its truncated SVD."""
    if combination == "cat":
        downs, ups = [], []
        for part in merged.parts:
            store = part.lora.source.store()
            module = part.target.module
            out, trailing = merged.weight_shape[0], merged.planned.up_shape[2:]
            downs.append(
                store.get(module.down).float().reshape(module.rank, *merged.weight_shape[1:])
            )
            up = store.get(module.up).float().reshape(out, module.rank, *trailing)
            ups.append(up * _scale(part))
        return torch.cat(downs), torch.cat(ups, dim=1)
    delta = torch.zeros(merged.weight_shape)
    for part in merged.parts:
        module = part.target.module
        store = part.lora.source.store()
        delta += LowRankDelta(store, module.up, module.down, _scale(part)).delta(
            merged.weight_shape
        )
    found = factor(delta, rank=merged.planned.rank, split="up", name=merged.planned.name)
    return found.down, found.up


def merge_lora_files(
    model: ModelSource,
    loras: Sequence[tuple[ModelSource, float]],
    out_dir: str | Path,
    combination: Combination = "cat",
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """LoRA files of ``model`` (each with its weight) merged into one kohya-format LoRA in the
    new folder ``out_dir``; ``metadata`` (the recipe) goes into its header. Returns the file."""
    modules = plan_lora_merge(model, loras, combination, rank)
    for source, _ in loras:
        download(source)
    first = loras[0][0]
    dtype = next(iter(first.tensors.values())).dtype
    return write_kohya_lora(
        Path(out_dir),
        [m.planned for m in modules],
        (_product_factors(m, combination) for m in modules),
        dtype,
        metadata or {},
    )
