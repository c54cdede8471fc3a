"""What a diffusion merge writes besides the merged tensors: a VAE baked in from another
checkpoint, the names ``discard`` leaves out, and the other layout's names when the recipe
asks for one (``output_layout``).

All of it is decided from names and shapes before a weight is read, in the plan; the writer
renames as it goes (:mod:`merge_engine.output.conversion`). A layout change is a list
of :class:`~merge_engine.sources.formats.sd_names.Renamed` targets, each made from one or a few merged
tensors (SDXL's second text encoder fuses q, k and v into one tensor in the single-file
layout), so the writer holds at most those few tensors at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TypeVar

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.plan.merge_plan import TensorInput, TensorTask
from merge_engine.recipe.patterns import NameFilter
from merge_engine.sources.formats.layouts import Layout, component_of
from merge_engine.sources.formats.sd_names import Renamed, convert_names
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.tensors import TensorInfo

T = TypeVar("T")


def _vae_prefix(names: Iterable[str]) -> str:
    """What a bare VAE's names lack to be a checkpoint's: nothing when they carry the
    single-file prefix already, else diffusers' folder (``down_blocks``, ``mid_block``) or the
    single-file prefix."""
    names = list(names)
    if any(n.startswith("first_stage_model.") for n in names):
        return ""
    diffusers = any("down_blocks." in n or "mid_block." in n for n in names)
    return "vae/" if diffusers else "first_stage_model."


def vae_source(source: ModelSource, layout: Layout) -> ModelSource:
    """The VAE in ``source`` (a whole checkpoint's, a diffusers VAE, a single-file VAE) with
    its tensors named as ``layout`` names a VAE; converted on read where layouts differ."""
    if source.layout.is_diffusion:
        tensors = {n: i for n, i in source.tensors.items() if component_of(n) == "vae"}
    elif source.layout.family == "state_dict":
        prefix = _vae_prefix(source.tensors)
        tensors = {prefix + n: replace(i, key=i.key or n) for n, i in source.tensors.items()}
        tensors = {n: i for n, i in tensors.items() if component_of(n) == "vae"}
    else:
        tensors = {}
    if not tensors:
        raise IncompatibleModelsError(
            f"vae {source.ref} is {source.layout} with no VAE in it; give a diffusers VAE, "
            "a single-file VAE, or a checkpoint that holds one"
        )
    named = {
        n: i for n, i in tensors.items() if n.startswith("vae/") == (layout.format == "diffusers")
    }
    if named:
        return ModelSource(
            source.ref, source.config, named, source.revision, layout=layout, origin=source
        )
    renamed, _ = convert_names(
        layout.family, {n: i.shape for n, i in tensors.items()}, to=layout.format
    )
    converted = {
        r.name: TensorInfo(
            r.shape,
            tensors[r.parts[0]].dtype,
            tensors[r.parts[0]].file,
            tensors[r.parts[0]].key or r.parts[0],
        )
        for r in renamed
    }
    return ModelSource(
        source.ref,
        source.config,
        converted,
        source.revision,
        layout=layout,
        origin=source,
        renames={r.name: r for r in renamed},
        origin_tensors=tensors,
    )


def bake_vae(
    tasks: list[TensorTask], vae: ModelSource, out_dtype: torch.dtype | None
) -> list[TensorTask]:
    """The plan's VAE tensors taken from ``vae`` as they are (cast only to ``out_dtype``)."""
    baked = []
    for task in tasks:
        if component_of(task.output) != "vae":
            baked.append(task)
            continue
        info = vae.tensors.get(task.output)
        if info is None:
            raise IncompatibleModelsError(
                f"vae {vae.ref} has no tensor {task.output}, which the models' VAE has; "
                "bake a VAE made for this model family"
            )
        if info.shape != task.shape:
            raise IncompatibleModelsError(
                f"vae {vae.ref} does not fit: its {task.output} has shape {list(info.shape)}, "
                f"the models' {list(task.shape)}; bake a VAE made for this model family"
            )
        dtype = out_dtype or info.dtype
        read = [TensorInput(vae.ref, task.output)]
        baked.append(
            TensorTask(task.output, task.shape, read, None, {}, [{}], dtype, dtype, copy_only=True)
        )
    return baked


def plan_writes(
    tasks: list[TensorTask], layout: Layout, output_format: str, discard: list[str]
) -> tuple[list[TensorTask], list[Renamed] | None]:
    """The tasks still needed and, when the output layout differs from the sources', the
    tensors to write in the order they become complete as the tasks run."""
    discarded = NameFilter(discard)
    if output_format == layout.format:
        return _some_left([t for t in tasks if not discarded(t.output)], tasks), None
    shapes = {t.output: t.shape for t in tasks}
    renamed, _ = convert_names(layout.family, shapes, to=output_format)
    renamed = _some_left([r for r in renamed if not discarded(r.name)], renamed)
    used = {part for r in renamed for part in r.parts}
    tasks = [t for t in tasks if t.output in used]
    done_at = {t.output: index for index, t in enumerate(tasks)}
    renamed.sort(key=lambda r: max(done_at[p] for p in r.parts))
    return tasks, renamed


def _some_left(kept: list[T], before: list[T]) -> list[T]:
    """``kept``, unless ``discard`` left nothing of what there was ``before``."""
    if before and not kept:
        raise RecipeError(
            "leaves out every tensor of the models, so nothing would be written; match only the "
            "names to leave out",
            field="discard",
        )
    return kept
