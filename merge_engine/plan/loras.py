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
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.baked_loras import BakedLora, bake_lora
from merge_engine.sources.formats.blocks import block_names
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
        baked = []
        for j, lora in enumerate(entry.loras):
            full = bake_lora(model, sources[lora.lora], lora.strength)
            if lora.blocks is not None:
                values = _block_values(lora.blocks, full, layout.family, f"{where}[{j}].blocks")
                full = full.by_block(values)
            baked.append(full)
        found[entry.model] = replace(model, loras=model.loras + tuple(baked))
    return found


def _block_values(
    row: list[float], lora: BakedLora, family: Family, where: str
) -> dict[str, float]:
    """A row of block strengths by block name: the family's full row or LBW's short one, which
    must name every block the LoRA changes."""
    full, short = block_names(family), SHORT_ROWS[family]
    if len(row) not in (len(full), len(short)):
        raise RecipeError(
            f"has {len(row)} block strengths, but an {_NAMES[family]} LoRA takes "
            f"{len(full)} ({', '.join(full)}) or {len(short)} ({', '.join(short)})",
            field=where,
        )
    values = dict(zip(full if len(row) == len(full) else short, row, strict=True))
    missing = sorted({t.block for t in lora.targets} - set(values), key=full.index)
    if missing:
        raise RecipeError(
            f"the LoRA changes {', '.join(missing)}, which a row of {len(short)} does not name; "
            f"give all {len(full)} blocks ({', '.join(full)})",
            field=where,
        )
    return values


_NAMES = {"sd1": "SD1.5", "sdxl": "SDXL"}
