"""The pre-flight of ``models[i].loras``: each LoRA file read from its header, each of its
modules mapped to the checkpoint tensor it changes, the block strengths checked against the
family's blocks; what is refused is refused here, before any weight is read.

Block strengths are typed as the LoRA Block Weight extension takes them: one value per block of
the checkpoint's block list (SD1.5 26, SDXL 20: ``BASE, IN00 …``), or its shorter rows, which
name only the blocks a plain LoRA changes (SD1.5 17: ``BASE, IN01, IN02, IN04, IN05, IN07,
IN08, M00, OUT03 … OUT11``; SDXL 12: ``BASE, IN04, IN05, IN07, IN08, M00, OUT00 … OUT05``).
``BASE`` covers the text encoders.
"""

from __future__ import annotations

from dataclasses import replace

from merge_engine.errors import RecipeError
from merge_engine.recipe.schema import LoraEntry, ModelReference, Recipe
from merge_engine.sources.baked_loras import BakedLora
from merge_engine.sources.formats.blocks import block_names
from merge_engine.sources.formats.kohya_lora import LoraTarget, lora_targets, read_lora_modules
from merge_engine.sources.formats.layouts import Family, Layout
from merge_engine.sources.inspection import ModelSource

SHORT_ROWS: dict[str, tuple[str, ...]] = {
    "sd1": (
        "BASE",
        "IN01",
        "IN02",
        "IN04",
        "IN05",
        "IN07",
        "IN08",
        "M00",
        *(f"OUT{i:02}" for i in range(3, 12)),
    ),
    "sdxl": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02}" for i in range(6))),
}
"""The LoRA Block Weight extension's short rows: the blocks that hold attention."""


def plan_loras(
    recipe: Recipe, sources: dict[ModelReference, ModelSource], layout: Layout, uses_base: bool
) -> dict[ModelReference, ModelSource]:
    """``sources`` with each model that has ``loras`` replaced by one that bakes them."""
    found = dict(sources)
    for i, entry in enumerate(recipe.models or []):
        if not entry.loras:
            continue
        where = f"models[{i}].loras"
        if not layout.is_diffusion:
            raise RecipeError(
                f"bakes LoRAs into diffusion checkpoints (SD1.5, SDXL), and {entry.model} is "
                f"{layout}; apply a PEFT adapter as model: base+adapter",
                field=where,
            )
        if uses_base and entry.model == recipe.base_model:
            raise RecipeError(
                f"{entry.model} is also the base_model, which would carry the LoRAs too; bake "
                "them into a model that is not the base, or use a method without a base",
                field=where,
            )
        model = sources[entry.model]
        shapes = {name: info.shape for name, info in model.tensors.items()}
        baked = []
        for j, lora in enumerate(entry.loras):
            lora_source = sources[lora.lora]
            lora_shapes = {name: info.shape for name, info in lora_source.tensors.items()}
            modules = read_lora_modules(lora_shapes, str(lora.lora))
            targets = lora_targets(modules, layout, shapes, str(lora.lora), str(entry.model))
            strengths = _strengths(lora, targets, layout.family, f"{where}[{j}].blocks")
            kept = [(t, s) for t, s in zip(targets, strengths, strict=True) if s != 0]
            baked.append(
                BakedLora(
                    lora_source,
                    tuple(t for t, _ in kept),
                    tuple(s for _, s in kept),
                    lora.strength,
                )
            )
        found[entry.model] = replace(model, loras=tuple(baked))
    return found


def _strengths(
    entry: LoraEntry, targets: list[LoraTarget], family: Family, where: str
) -> list[float]:
    """Each target's strength: the entry's, times its block's when ``blocks`` is given."""
    if entry.blocks is None:
        return [entry.strength] * len(targets)
    full, short = block_names(family), SHORT_ROWS[family]
    if len(entry.blocks) not in (len(full), len(short)):
        raise RecipeError(
            f"has {len(entry.blocks)} block strengths, but an {_NAMES[family]} LoRA takes "
            f"{len(full)} ({', '.join(full)}) or {len(short)} ({', '.join(short)})",
            field=where,
        )
    named = full if len(entry.blocks) == len(full) else short
    values = dict(zip(named, entry.blocks, strict=True))
    missing = sorted({t.block for t in targets} - set(values), key=full.index)
    if missing:
        raise RecipeError(
            f"the LoRA changes {', '.join(missing)}, which a row of {len(short)} does not name; "
            f"give all {len(full)} blocks ({', '.join(full)})",
            field=where,
        )
    return [entry.strength * values[t.block] for t in targets]


_NAMES = {"sd1": "SD1.5", "sdxl": "SDXL"}
