"""A recipe's ``align`` step: before the merge, every other model the merge reads is permuted
to match the reference model's hidden units (Git Re-Basin), then the merge streams as usual,
each tensor permuted as it is read. The permutations are saved next to the output
(``alignment/<model>.json``) and documented in the card.

Pre-flight builds the permutation spec from the config and the safetensors headers, so an
unsupported family or a model that does not fit is refused before anything is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from merge_engine import calibration
from merge_engine.align import (
    Alignment,
    MatchReport,
    Permutations,
    PermutationSpec,
    activation_matching,
    save_permutations,
    transformer_spec,
    weight_matching,
)
from merge_engine.align.spec import permute_tensor
from merge_engine.calibration import CalibrationSource, load_model
from merge_engine.errors import RecipeError
from merge_engine.io import TensorStore
from merge_engine.recipe import ModelReference, Recipe
from merge_engine.sources import ModelSource

ALIGNMENT_FOLDER = "alignment"


@dataclass
class AlignmentPlan:
    """What the align step will do, and (once run) what it found."""

    method: str
    reference: ModelReference
    spec: PermutationSpec
    models: list[ModelReference]
    """The models permuted to match the reference."""
    max_iter: int = 100
    seed: int = 0
    perms: dict[ModelReference, Permutations] = field(default_factory=dict)
    reports: dict[ModelReference, MatchReport] = field(default_factory=dict)
    files: dict[ModelReference, str] = field(default_factory=dict)


def plan_alignment(
    recipe: Recipe,
    sources: Mapping[ModelReference, ModelSource],
    read: list[ModelReference],
    data: Mapping[ModelReference, CalibrationSource],
    needs_data: bool,
) -> AlignmentPlan | None:
    """Check the ``align`` block against the models' metadata; ``read`` are the models whose
    tensors the merge reads."""
    align = recipe.align
    if align is None:
        return None
    if recipe.slices:
        raise RecipeError(
            "align permutes whole models; list them under 'models', not 'slices'", field="align"
        )
    if needs_data:
        raise RecipeError(
            f"{recipe.merge_method} weighs each model by statistics of its own units, which align would reorder; "
            "use align with a data-free method (linear, slerp, ...)",
            field="align",
        )
    if align.repair:
        raise RecipeError(
            "REPAIR is available for MLP and CNN models in Python (merge_engine.align.repair), "
            "not yet for transformers models; remove repair",
            field="align.repair",
        )
    reference = align.reference or recipe.base_model or recipe.input_models()[0]
    if reference not in read:
        names = ", ".join(str(r) for r in read)
        raise RecipeError(
            f"the reference {reference} is not one of the models merged ({names}); name one of them",
            field="align.reference",
        )
    spec = model_spec(sources[reference])
    others = [ref for ref in read if ref != reference]
    for ref in others:
        shapes = {k: info.shape for k, info in sources[ref].tensors.items()}
        spec.check_shapes(shapes, str(ref))
    if align.method == "activation_matching" and reference not in data:
        raise RecipeError(
            "activation_matching compares the models' activations on calibration data; "
            "add a calibration block (shared, or on the reference model)",
            field="align.method",
        )
    return AlignmentPlan(align.method, reference, spec, others, align.max_iter, align.seed)


def model_spec(source: ModelSource) -> PermutationSpec:
    """The permutation spec of a transformers checkpoint, from its config and headers."""
    shapes = {name: info.shape for name, info in source.tensors.items()}
    return transformer_spec(SimpleNamespace(**source.config), shapes)


def _full_state(store: TensorStore, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: store.get(name).float() for name in names}


def _file_name(ref: ModelReference) -> str:
    return re.sub(r"[^\w.-]+", "_", str(ref).strip("/")) + ".json"


def run_alignment(
    alignment: AlignmentPlan,
    sources: Mapping[ModelReference, ModelSource],
    data: Mapping[ModelReference, CalibrationSource],
    folder: Path,
    device: torch.device,
    show_progress: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> None:
    """Match every model to the reference and save each one's permutations under ``folder``;
    ``progress`` hears of each model aligned (a caller may raise from it to stop)."""
    reference = sources[alignment.reference]
    names = list(alignment.spec.axes)
    anchor = None
    for ref in tqdm(alignment.models, desc="Aligning", unit="model", disable=not show_progress):
        if alignment.method == "weight_matching":
            if anchor is None:
                anchor = _full_state(reference.store(), names)
            found = weight_matching(
                anchor,
                _full_state(sources[ref].store(), names),
                alignment.spec,
                max_iter=alignment.max_iter,
                seed=alignment.seed,
                device=str(device),
            )
        else:
            found = _activation_matching(alignment, sources, data, ref, device)
        alignment.perms[ref] = found.perms
        alignment.reports[ref] = found.report
        path = folder / ALIGNMENT_FOLDER / _file_name(ref)
        save_permutations(found.perms, path, alignment.spec)
        alignment.files[ref] = f"{ALIGNMENT_FOLDER}/{path.name}"
        if progress:
            progress(0, 1, f"aligned {ref}")


def _activation_matching(
    alignment: AlignmentPlan,
    sources: Mapping[ModelReference, ModelSource],
    data: Mapping[ModelReference, CalibrationSource],
    ref: ModelReference,
    device: torch.device,
) -> Alignment:
    """Both models run on the reference's calibration data, tokenized by its tokenizer."""
    reference = sources[alignment.reference]
    tokenizer = calibration.load_tokenizer([reference.folder], alignment.reference)
    batches = calibration.batches(data[alignment.reference], tokenizer)
    return activation_matching(
        load_model(reference), load_model(sources[ref]), batches, alignment.spec, device=str(device)
    )


class PermutedStore:
    """A model's tensors as the merge reads them: each one permuted on the way."""

    def __init__(self, store: TensorStore, spec: PermutationSpec, perms: Permutations):
        self.store, self.spec, self.perms = store, spec, perms

    def get(self, name: str) -> torch.Tensor:
        return permute_tensor(self.spec, name, self.store.get(name), self.perms)

    def release(self, file: str) -> None:
        self.store.release(file)
