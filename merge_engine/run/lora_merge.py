"""Running a merge of Stable Diffusion LoRA files into one kohya-format LoRA file, as
sd-scripts' ``merge_lora.py --concat`` and ``svd_merge_lora.py`` do (PEFT's ``cat`` and ``svd``),
one module in memory at a time; the plan is :mod:`merge_engine.plan.lora_file_plan`.

* ``cat``: each module's factors stacked, ``down = [down_1; down_2; …]`` and
  ``up = [w_1 s_1 up_1, w_2 s_2 up_2, …]`` (``s_i = alpha_i / r_i``, ``w_i`` the file's weight):
  ``up @ down`` is exactly ``Σ w_i s_i up_i @ down_i``, whatever the ranks (sd-scripts scales by
  square roots and keeps the first file's alpha; the product is the same sum only when the
  ranks and alphas agree, so mergebot computes the sum itself).
* ``svd``: the same sum as a full delta, then its truncated SVD at the rank (clamped to what
  each module can hold), singular values on the up factor as sd-scripts puts them. sd-scripts
  also clips the factors' values at their 99th percentile; mergebot does not, so the file
  holds the best rank-r approximation (Eckart–Young), nothing else.

Modules are matched through the base checkpoint, so kohya, LDM-named and diffusers files of one
family merge together; the output names every module as sd-scripts does for the family, and its
header holds the pinned recipe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from merge_engine.methods.low_rank import factor
from merge_engine.output.kohya_lora import write_kohya_lora
from merge_engine.plan.lora_file_plan import (
    LoraFilePlan,
    LoraPart,
    MergedModule,
    build_lora_file_plan,
)
from merge_engine.recipe.schema import ModelReference
from merge_engine.run.executor import Progress
from merge_engine.sources.inspection import ModelSource, download
from merge_engine.sources.low_rank import LowRankDelta
from merge_engine.sources.tensors import TensorStore

RECIPE_KEY = "mergebot_recipe"
"""The header entry holding the recipe (YAML) that made the file."""


def _scale(part: LoraPart, store: TensorStore) -> float:
    """``strength * alpha / r`` of one LoRA module (alpha read from its file's ``store``)."""
    module = part.target.module
    alpha = float(store.get(module.alpha).item()) if module.alpha else module.rank
    return part.strength * alpha / module.rank


def _product_factors(
    merged: MergedModule, combination: str, stores: Mapping[ModelReference, TensorStore]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) whose product is the module's summed delta (``cat``) or its truncated SVD;
    ``stores`` holds each LoRA file open, by reference."""
    if combination == "cat":
        downs, ups = [], []
        for part in merged.parts:
            store = stores[part.lora.source.ref]
            module = part.target.module
            out, trailing = merged.weight_shape[0], merged.planned.up_shape[2:]
            downs.append(
                store.get(module.down).float().reshape(module.rank, *merged.weight_shape[1:])
            )
            up = store.get(module.up).float().reshape(out, module.rank, *trailing)
            ups.append(up * _scale(part, store))
        return torch.cat(downs), torch.cat(ups, dim=1)
    delta = torch.zeros(merged.weight_shape)
    for part in merged.parts:
        module = part.target.module
        store = stores[part.lora.source.ref]
        delta += LowRankDelta(store, module.up, module.down, _scale(part, store)).delta(
            merged.weight_shape
        )
    found = factor(delta, rank=merged.planned.rank, split="up", name=merged.planned.name)
    return found.down, found.up


def download_lora_files(
    plan: LoraFilePlan, token: str | bool | None = None, cache_dir: Path | None = None
) -> None:
    """Fetch each Hub LoRA file at the commit the pre-flight read (the base is never read)."""
    for lora in plan.loras:
        download(lora, token, cache_dir=cache_dir)


def write_lora_file_merge(
    plan: LoraFilePlan,
    out_dir: str | Path,
    *,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Download the LoRA files (not the base) and write the merged LoRA into the new folder
    ``out_dir`` (published whole or not at all); the pinned recipe goes into its header.
    ``progress`` counts modules. Returns the folder."""
    download_lora_files(plan, token, cache_dir)
    recipe = plan.pinned_recipe()
    metadata = {RECIPE_KEY: recipe.to_yaml()} if recipe else {}
    total = len(plan.modules)
    stores = {lora.ref: lora.store() for lora in plan.loras}  # each file opened once

    def factors() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for done, module in enumerate(
            tqdm(plan.modules, desc=f"{plan.combination} of LoRA files", disable=not show_progress)
        ):
            yield _product_factors(module, plan.combination, stores)
            if progress is not None:
                progress(done + 1, total, module.planned.name)

    write_kohya_lora(
        Path(out_dir), [m.planned for m in plan.modules], factors(), plan.dtype, metadata
    )
    return Path(out_dir)


def merge_lora_files(
    base: ModelSource,
    loras: Sequence[tuple[ModelSource, float]],
    out_dir: str | Path,
    combination: str = "cat",
    rank: int | None = None,
) -> Path:
    """LoRA files of ``base`` (each with its weight) merged into one kohya-format LoRA file in
    the new folder ``out_dir``, without a recipe; returns the file."""
    plan = build_lora_file_plan(
        base, [s for s, _ in loras], [w for _, w in loras], combination, rank
    )
    return write_lora_file_merge(plan, out_dir) / "pytorch_lora_weights.safetensors"
