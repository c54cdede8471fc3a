"""A Stable Diffusion fine-tune and its base (SD1.5 or SDXL, one layout) into a kohya-format LoRA
at a rank, as sd-scripts' ``extract_lora_from_models.py`` does: each module sd-scripts gives a
LoRA (the UNet's attention blocks and the text encoders' attention and MLP; with ``conv``,
LoCon's convolutions too) gets the truncated SVD of ``fine-tune - base``, singular values on
the up factor, the rank clamped to what the module can hold. Streamed one module at a time
into :func:`merge_engine.output.kohya_lora.write_kohya_lora`; the file loads in diffusers
(``load_lora_weights``) and the WebUI, and the result lists each module's relative error
(the dropped singular values' share of the difference's Frobenius norm).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.methods.low_rank import check_rank_value, factor, max_rank
from merge_engine.output.kohya_lora import write_kohya_lora
from merge_engine.plan.merge_plan import PlannedModule
from merge_engine.sources.formats.kohya_lora import ModulePlace, lora_places
from merge_engine.sources.inspection import ModelSource, download


@dataclass
class SdExtractionPlan:
    finetune: ModelSource
    base: ModelSource
    places: list[ModulePlace]
    modules: list[PlannedModule]
    dtype: torch.dtype


@dataclass
class SdExtractedModule:
    name: str
    rank: int
    relative_error: float


@dataclass
class SdExtraction:
    out: Path
    modules: list[SdExtractedModule] = field(default_factory=list)


def plan_sd_extraction(
    finetune: ModelSource,
    base: ModelSource,
    rank: int,
    conv: bool = False,
    dtype: torch.dtype | None = None,
) -> SdExtractionPlan:
    """Check the pair from headers alone and size every module; each refusal one sentence."""
    check_rank_value(rank)
    if finetune.layout != base.layout:
        raise IncompatibleModelsError(
            f"the fine-tune {finetune.ref} is {finetune.layout} and the base {base.ref} is "
            f"{base.layout}; give the base the fine-tune was trained from, in the same layout"
        )
    shapes = {name: info.shape for name, info in finetune.tensors.items()}
    places = lora_places(finetune.layout, shapes, conv)
    for place in places:
        other = base.tensors.get(place.tensor)
        if other is None or other.shape != finetune.tensors[place.tensor].shape:
            found = "missing" if other is None else f"{list(other.shape)}"
            raise IncompatibleModelsError(
                f"{place.tensor} is {list(finetune.tensors[place.tensor].shape)} in the "
                f"fine-tune {finetune.ref} but {found} in the base {base.ref}; give the base "
                "the fine-tune was trained from"
            )
    largest = max(max_rank(p.shape) for p in places)
    if rank > largest:
        raise RecipeError(
            f"{rank} is larger than any weight the LoRA changes can hold (the largest holds "
            f"{largest}); ask for a rank of at most {largest}",
            "rank",
        )
    modules = []
    for place in places:
        r = min(rank, max_rank(place.shape))
        trailing = (1,) * (len(place.shape) - 2)
        modules.append(
            PlannedModule(place.kohya_name, (r, *place.shape[1:]), (place.shape[0], r, *trailing))
        )
    first = finetune.tensors[places[0].tensor].dtype
    return SdExtractionPlan(finetune, base, places, modules, dtype or first)


def _rows(tensor: torch.Tensor, place: ModulePlace) -> torch.Tensor:
    return tensor if place.rows is None else tensor[place.rows[0] : place.rows[1]]


def extract_sd_lora(
    plan: SdExtractionPlan, out_dir: str | Path, metadata: dict[str, str] | None = None
) -> SdExtraction:
    """Write the LoRA into the new folder ``out_dir``; ``metadata`` joins the file's header."""
    download(plan.finetune)
    download(plan.base)
    tuned, base = plan.finetune.store(), plan.base.store()
    result = SdExtraction(Path(out_dir))

    def factors() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for place, module in zip(plan.places, plan.modules, strict=True):
            delta = _rows(tuned.get(place.tensor), place).float()
            delta -= _rows(base.get(place.tensor), place).float()
            found = factor(delta, rank=module.rank, split="up", name=module.name)
            result.modules.append(SdExtractedModule(module.name, found.rank, found.relative_error))
            yield found.down, found.up

    source = {
        "finetune": str(plan.finetune.ref),
        "finetune_revision": plan.finetune.revision,
        "base": str(plan.base.ref),
        "base_revision": plan.base.revision,
    }
    header = {"mergebot_extraction": json.dumps(source), **(metadata or {})}
    result.out = write_kohya_lora(Path(out_dir), plan.modules, factors(), plan.dtype, header)
    return result
