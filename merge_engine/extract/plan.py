"""What an extraction will do, decided from configs and safetensors headers alone (seconds, no
weights read): the fine-tune and its base checked against each other, and each tensor given
its part: factored into a LoRA, saved whole (``modules_to_save``) or left out.

Which modules are factored, by default: every linear weight (``nn.Linear``, and GPT-2's
``Conv1D``) inside the transformer layers, as ``mergekit-extract-lora`` does. The module types
come from the architecture built on the meta device (no memory, no weights), so an embedding
or a norm inside a layer is never taken for a linear layer. ``lora_embeddings`` adds the input
embedding and the output head (as ``mergekit-extract-lora --embed-lora``); ``save`` names
modules stored whole. Everything else (norms, biases, embeddings by default) is left out of
the adapter: the extraction measures how much each such tensor differs, and the card lists the
ones that do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError, SourceError
from merge_engine.methods.low_rank import check_energy, check_rank, check_rank_value
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.inspection import ModelSource, inspect_model, model_class
from merge_engine.sources.layers import is_input_embedding, is_output_head, sort_key, split_layer
from merge_engine.sources.model_building import building_model

Kind = Literal["linear", "transposed", "embedding"]
"""How PEFT holds a module's update: ``B @ A`` in the weight's own layout (``nn.Linear``), or
transposed: GPT-2's ``Conv1D`` keeps its weight in × out (``fan_in_fan_out``), and an
embedding's update is ``(B @ A)ᵀ``. A transposed module's delta is factored transposed."""


@dataclass(frozen=True)
class ExtractedModule:
    """One module whose difference becomes a LoRA."""

    name: str
    """Its path in the model (``model.layers.0.self_attn.q_proj``); its weight is ``name.weight``."""
    shape: tuple[int, ...]
    """The weight's shape in the checkpoints."""
    kind: Kind

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"

    @property
    def factored_shape(self) -> tuple[int, ...]:
        """The shape of the matrix factored: out × in (a transposed module's delta flipped)."""
        return self.shape[::-1] if self.kind != "linear" else self.shape


@dataclass
class ExtractionPlan:
    finetune: ModelSource
    base: ModelSource
    modules: list[ExtractedModule]
    saved: list[str]
    """Tensor names stored whole from the fine-tune (``modules_to_save``)."""
    left_out: list[str]
    """Every other floating-point tensor: compared, listed in the card when it differs."""
    rank: int | None
    energy: float | None
    dtype: torch.dtype
    """The factors' dtype."""

    @property
    def fan_in_fan_out(self) -> bool:
        return any(m.kind == "transposed" for m in self.modules)


def _module_kinds(source: ModelSource) -> dict[str, str]:
    """Each module path of the architecture with its class: ``Linear``, ``Conv1D``,
    ``Embedding``, ``LlamaRMSNorm``..., from the model built on the meta device."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(**source.config)
        with building_model(), torch.device("meta"):
            model = model_class(source.config).from_config(config)
    except (ValueError, KeyError, TypeError, ImportError, OSError) as error:
        architecture = (source.config.get("architectures") or ["?"])[0]
        raise SourceError(
            f"{source.ref}'s architecture {architecture} is not one this transformers builds "
            f"({type(error).__name__}); extract-lora reads the module types from it: upgrade "
            "transformers, or extract from a model it knows"
        ) from None
    return {name: type(module).__name__ for name, module in model.named_modules()}


def _check_pair(finetune: ModelSource, base: ModelSource) -> None:
    for source, role in ((finetune, "fine-tune"), (base, "base")):
        if source.layout != TRANSFORMERS:
            raise IncompatibleModelsError(
                f"the {role} {source.ref} is {source.layout}, not a transformers language model; "
                "extract-lora takes a transformers fine-tune and its base"
            )
    ours = (finetune.config.get("architectures"), finetune.config.get("model_type"))
    theirs = (base.config.get("architectures"), base.config.get("model_type"))
    if ours != theirs:
        raise IncompatibleModelsError(
            f"the fine-tune {finetune.ref} is a {ours[1]} ({', '.join(ours[0] or ['?'])}) and "
            f"the base {base.ref} a {theirs[1]} ({', '.join(theirs[0] or ['?'])}); "
            "give the base the fine-tune was trained from"
        )
    for name in sorted(finetune.tensors.keys() ^ base.tensors.keys(), key=sort_key)[:1]:
        has, lacks = (finetune, base) if name in finetune.tensors else (base, finetune)
        raise IncompatibleModelsError(
            f"tensor {name} is in {has.ref} but missing from {lacks.ref}; "
            "give the base the fine-tune was trained from, both with all their weight files"
        )
    for name, info in sorted(finetune.tensors.items(), key=lambda item: sort_key(item[0])):
        other = base.tensors[name].shape
        if info.shape != other:
            raise IncompatibleModelsError(
                f"tensor {name} is {'×'.join(map(str, info.shape))} in the fine-tune "
                f"{finetune.ref} but {'×'.join(map(str, other))} in the base {base.ref}; "
                "give the base the fine-tune was trained from (with the same vocabulary)"
            )


def _matches(module: str, patterns: Sequence[str]) -> bool:
    """A module named exactly, or by its last parts (``lm_head``, ``norm``, ``self_attn.o_proj``)."""
    return any(module == p or module.endswith("." + p) for p in patterns)


def _reference(value: ModelReference | str | Path, role: str) -> ModelReference:
    try:
        return ModelReference.parse(value if isinstance(value, ModelReference) else str(value))
    except ValueError as error:
        raise RecipeError(str(error), role) from None


def plan_extraction(
    finetune: ModelReference | str | Path,
    base: ModelReference | str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    save: Sequence[str] = (),
    lora_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    token: str | bool | None = None,
    hub_only: bool = False,
) -> ExtractionPlan:
    """Check a fine-tune and its base (local folders or Hub references, pinned to commits) and
    decide each tensor's part; every refusal is one sentence, before any weight is read.
    ``rank`` and/or ``energy`` (see :func:`merge_engine.methods.low_rank.factor`); ``save``
    modules stored whole; ``dtype`` of the factors (default: the fine-tune's)."""
    if rank is None and energy is None:
        raise RecipeError("give a rank, an energy threshold or both", "rank")
    if rank is not None:
        check_rank_value(rank)
    if energy is not None:
        check_energy(energy)
    refs = {
        role: _reference(value, role) for role, value in (("finetune", finetune), ("base", base))
    }
    finetune_source = inspect_model(refs["finetune"], token, hub_only=hub_only)
    base_source = inspect_model(refs["base"], token, hub_only=hub_only)
    _check_pair(finetune_source, base_source)
    kinds = _module_kinds(finetune_source)
    modules, saved, left_out, unmatched = [], [], [], set(save)
    for name in sorted(finetune_source.tensors, key=sort_key):
        info = finetune_source.tensors[name]
        if not info.dtype.is_floating_point:
            continue
        module, _, leaf = name.rpartition(".")
        if _matches(module, save):
            saved.append(name)
            unmatched -= {p for p in save if _matches(module, [p])}
            continue
        kind = {"Linear": "linear", "Conv1D": "transposed", "Embedding": "embedding"}.get(
            kinds.get(module, "")
        )
        in_layers = split_layer(name) is not None and kind in ("linear", "transposed")
        embedding = is_input_embedding(name) or is_output_head(name)
        wanted = in_layers or (lora_embeddings and embedding and kind is not None)
        if leaf == "weight" and len(info.shape) == 2 and wanted:
            modules.append(ExtractedModule(module, info.shape, kind))
        else:
            left_out.append(name)
    if unmatched:
        raise RecipeError(
            f"no module of {finetune_source.ref} is named {sorted(unmatched)[0]!r}; name a module "
            "by its path or its last parts, e.g. lm_head or model.embed_tokens",
            "save",
        )
    if not modules:
        raise IncompatibleModelsError(
            f"{finetune_source.ref} has no linear layer inside its transformer layers to extract; "
            "extract-lora factors the linear weights of a transformers language model"
        )
    if len({m.kind == "linear" for m in modules if m.kind != "embedding"}) > 1:
        raise IncompatibleModelsError(
            f"{finetune_source.ref} mixes nn.Linear and Conv1D layers, which one PEFT adapter "
            "cannot hold (fan_in_fan_out is one setting); leave the head out"
        )
    if rank is not None:
        for module in modules:
            check_rank(rank, module.factored_shape, module.weight)
    return ExtractionPlan(
        finetune=finetune_source,
        base=base_source,
        modules=modules,
        saved=saved,
        left_out=left_out,
        rank=rank,
        energy=energy,
        dtype=dtype or finetune_source.tensors[modules[0].weight].dtype,
    )
