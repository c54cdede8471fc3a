"""Which layout a checkpoint is in, told from its file names and safetensors headers alone.

- a transformers model: ``config.json`` with its architecture, weights named by layer;
- Stable Diffusion 1.5 or SDXL, either as diffusers save it (``model_index.json`` and one
  folder per component: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) or as one
  single file in the original layout (UNet under ``model.diffusion_model.``, VAE under
  ``first_stage_model.``, text encoders under ``cond_stage_model.`` or
  ``conditioner.embedders.``);
- a bare state dict: safetensors weights and nothing that says what they are, merged by name.

Other diffusion layouts (SD2, SD3, FLUX, ...) are recognised only to be refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from merge_engine.errors import SourceError

Family = Literal["transformers", "sd1", "sdxl", "state_dict"]
Format = Literal["transformers", "diffusers", "single_file", "state_dict"]

COVERED = (
    "SD1.5 and SDXL checkpoints (diffusers or single-file), transformers models, "
    "and bare safetensors state dicts"
)

PIPELINES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
}
"""diffusers pipeline classes (``_class_name`` of ``model_index.json``) mergebot merges."""

COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd1": ("text_encoder", "unet", "vae"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae"),
}
"""The components of a pipeline that hold weights, as diffusers names their folders."""

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
"""How diffusers names a component's weights: models, then transformers text encoders."""

SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.": "text_encoder",
    "conditioner.embedders.0.": "text_encoder",
    "conditioner.embedders.1.": "text_encoder_2",
}
"""Where each component lives in a single-file checkpoint."""

_NAMES = {"sd1": "SD1.5", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Layout:
    family: Family
    format: Format

    @property
    def is_diffusion(self) -> bool:
        return self.family in ("sd1", "sdxl")

    def __str__(self) -> str:
        if self.is_diffusion:
            form = "single file" if self.format == "single_file" else "diffusers"
            return f"{_NAMES[self.family]} ({form})"
        return "a transformers model" if self.family == "transformers" else "a bare state dict"


TRANSFORMERS = Layout("transformers", "transformers")
STATE_DICT = Layout("state_dict", "state_dict")


def _unsupported(names: set[str]) -> str | None:
    """The name of a diffusion layout mergebot recognises but does not merge, if it is one."""

    def has(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if has("model.diffusion_model.joint_blocks.") or has("text_encoders.clip_g."):
        return "SD3"
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "FLUX"
    if has("cond_stage_model.model."):
        return "SD2.x"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return "SDXL refiner"
    if has("model.diffusion_model.") or has("conditioner."):  # a VAE alone is a state dict
        return "an unrecognised diffusion"
    return None


def single_file_layout(names: Iterable[str], origin: str) -> Layout:
    """SD1.5 or SDXL in the single-file layout, else a bare state dict; a diffusion layout
    that is neither is refused, naming what it is and what mergebot covers."""
    names = set(names)

    def has(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if has("model.diffusion_model.") and has("first_stage_model."):
        if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
            return Layout("sdxl", "single_file")
        if has("cond_stage_model.transformer."):
            return Layout("sd1", "single_file")
    found = _unsupported(names)
    if found is None:
        return STATE_DICT
    raise SourceError(
        f"{origin} is {found} checkpoint, which mergebot does not merge; it merges {COVERED}"
    )


def pipeline_family(model_index: dict, origin: str) -> Family:
    """SD1.5 or SDXL from a diffusers ``model_index.json``; another pipeline is refused."""
    name = model_index.get("_class_name")
    if name not in PIPELINES:
        raise SourceError(
            f"{origin} is a diffusers {name or 'pipeline of unknown class'}, which mergebot does "
            f"not merge; it merges {COVERED}"
        )
    return PIPELINES[name]


def component_of(name: str) -> str | None:
    """The component a tensor belongs to: the folder of a diffusers name (``unet/...``), the
    prefix of a single-file name; None for a name of neither."""
    folder, slash, _ = name.partition("/")
    if slash:
        return folder
    return next((c for p, c in SINGLE_FILE_PREFIXES.items() if name.startswith(p)), None)


_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def component_tensor_name(component: str, key: str) -> str:
    """How a diffusers component's tensor is named in the model: ``component/key``, with a
    CLIP text encoder's keys in the Hub's ``text_model.``-prefixed form (transformers 5.6 and
    later save them without it), so pipelines saved by either merge together."""
    if component.startswith("text_encoder") and key.startswith(_CLIP_PARTS):
        key = f"text_model.{key}"
    return f"{component}/{key}"
