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
from merge_engine.data import calibration
from merge_engine.data.calibration import CalibrationSource, load_model
from merge_engine.errors import RecipeError
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.tensors import TensorStore

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
    if recipe.aligns_on_data() and reference not in data:
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
    match = _matcher(alignment, sources, data, device)
    for ref in tqdm(alignment.models, desc="Aligning", unit="model", disable=not show_progress):
        found = match(sources[ref])
        alignment.perms[ref] = found.perms
        alignment.reports[ref] = found.report
        path = folder / ALIGNMENT_FOLDER / _file_name(ref)
        save_permutations(found.perms, path, alignment.spec)
        alignment.files[ref] = f"{ALIGNMENT_FOLDER}/{path.name}"
        if progress:
            progress(0, 1, f"aligned {ref}")


def _matcher(
    alignment: AlignmentPlan,
    sources: Mapping[ModelReference, ModelSource],
    data: Mapping[ModelReference, CalibrationSource],
    device: torch.device,
) -> Callable[[ModelSource], Alignment]:
    """Matches one model to the reference; what the reference contributes (its weights, or
    its model and tokenized calibration data) is loaded once for every model."""
    reference, spec = sources[alignment.reference], alignment.spec
    if alignment.method == "weight_matching":
        names = list(spec.axes)
        anchor = _full_state(reference.store(), names)

        def by_weights(source: ModelSource) -> Alignment:
            state = _full_state(source.store(), names)
            return weight_matching(
                anchor,
                state,
                spec,
                max_iter=alignment.max_iter,
                seed=alignment.seed,
                device=str(device),
            )

        return by_weights
    # activation matching: both models run on the reference's data, with its tokenizer
    tokenizer = calibration.load_tokenizer([reference.folder], alignment.reference)
    batches = calibration.batches(data[alignment.reference], tokenizer)
    reference_model = load_model(reference)

    def by_activations(source: ModelSource) -> Alignment:
        return activation_matching(
            reference_model, load_model(source), batches, spec, device=str(device)
        )

    return by_activations


class PermutedStore:
    """A model's tensors as the merge reads them: each one permuted on the way."""

    def __init__(self, store: TensorStore, spec: PermutationSpec, perms: Permutations):
        self.store, self.spec, self.perms = store, spec, perms

    def get(self, name: str) -> torch.Tensor:
        return permute_tensor(self.spec, name, self.store.get(name), self.perms)

    def release(self, file: str) -> None:
        self.store.release(file)
