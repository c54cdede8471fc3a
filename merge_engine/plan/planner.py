"""Recipe + input metadata → one task per output tensor, with every parameter resolved.

Building the plan is the pre-flight: it reads only what :mod:`merge_engine.sources.inspection` learned
from configs and headers, and it raises every recipe or compatibility error before a single
weight is read. The runner then only executes tasks. What a plan holds is in
:mod:`merge_engine.plan.merge_plan`; how one tensor's task is resolved in
:mod:`merge_engine.plan.resolve`; slices, places, the output config and the writes in their
own modules of this folder.
"""

from __future__ import annotations

import difflib
import secrets

from merge_engine.align.step import plan_alignment
from merge_engine.data.calibration import CalibrationSource
from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.methods import MergeMethod, get_method
from merge_engine.plan.loras import plan_loras
from merge_engine.plan.merge_plan import DTYPES, MergePlan, TensorTask
from merge_engine.plan.output_config import output_config
from merge_engine.plan.places import describe_layers, tensor_places
from merge_engine.plan.resolve import InputGroup, TaskResolver, check_input_count
from merge_engine.plan.slices import plan_slices
from merge_engine.plan.writes import bake_vae, plan_writes, vae_source
from merge_engine.recipe.parameters import Scope
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources import layers
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.formats.recipe_checks import check_layout, common_layout
from merge_engine.sources.inspection import ModelSource, model_task

# --- the recipe against the method ---------------------------------------------------------


def check_parameter_names(recipe: Recipe, method: MergeMethod) -> None:
    known = {p.name: p for p in method.params}
    for path, block, level in recipe.parameter_levels():
        for name in block or {}:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                takes = ", ".join(known) or "no parameters"
                hint = f"did you mean '{close[0]}'?" if close else f"{method.name} takes: {takes}"
                raise RecipeError(
                    f"'{name}' is not a parameter of {method.name}; {hint}", field=f"{path}.{name}"
                )
            if level == "model" and known[name].scope == "global":
                raise RecipeError(
                    f"'{name}' applies to the whole merge, not to one model; move it to the top-level or slice parameters",
                    field=f"{path}.{name}",
                )


# --- whole models ---------------------------------------------------------------------------


def _plan_models(resolver: TaskResolver) -> None:
    """Whole models merged tensor by tensor: one task per tensor of the donor."""
    recipe, method = resolver.recipe, resolver.method
    models = [m.model for m in recipe.models]
    for i, ref in enumerate(models):
        if ref in models[:i]:
            raise RecipeError(
                f"model {ref} is listed twice; list each model once", field=f"models[{i}].model"
            )
    base = recipe.base_model if method.base != "unused" else None
    scopes = {
        m.model: (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)
    }
    inputs = [ref for ref in models if ref != base]
    check_input_count(method, len(inputs), "models")
    donor = resolver.sources[recipe.donor()]
    if donor.layout == TRANSFORMERS:
        _check_same_layers(resolver, [base, *inputs] if base else inputs)
    _check_no_extra_tensors(resolver, donor, [base, *inputs] if base else inputs)
    places = tensor_places(donor)
    global_scope: Scope = ("parameters", recipe.parameters)
    for name in places:
        shape = donor.tensors[name].shape
        group = InputGroup(
            inputs=[
                resolver.member(ref, name, shape, name, donor.ref, scopes[ref]) for ref in inputs
            ],
            base=resolver.member(base, name, shape, name, donor.ref) if base else None,
            shared_scopes=[global_scope],
            place=places[name],
        )
        resolver.resolve_task(name, shape, group)


def _check_same_layers(resolver: TaskResolver, models: list[ModelReference]) -> None:
    counts = {ref: layers.layer_counts(resolver.sources[ref].tensors) for ref in models}
    first = models[0]
    for ref in models[1:]:
        if counts[ref] != counts[first]:
            raise IncompatibleModelsError(
                f"{ref} has {describe_layers(counts[ref])} but {first} has {describe_layers(counts[first])}; "
                "merge models of one architecture, or use 'slices' to pick layer ranges"
            )


def _check_no_extra_tensors(
    resolver: TaskResolver, donor: ModelSource, models: list[ModelReference]
) -> None:
    for ref in models:
        extra = [
            n
            for n in resolver.sources[ref].tensors
            if n not in donor.tensors and not layers.tied_embedding(n, donor.tensors)
        ]
        if extra:
            raise IncompatibleModelsError(
                f"model {ref} has {len(extra)} tensor(s) that {donor.ref} lacks (e.g. {sorted(extra)[0]}); "
                "the models must share one architecture"
            )


# --- the plan -------------------------------------------------------------------------------


def _check_tokenizer_vocabulary(
    recipe: Recipe, sources: dict[ModelReference, ModelSource], tasks: list[TensorTask]
) -> None:
    """mergebot copies the tokenizer; it does not remap embeddings, so the vocabularies must agree."""
    if not isinstance(recipe.tokenizer_source, ModelReference):
        return
    tokens = sources[recipe.tokenizer_source].config.get("vocab_size")
    rows = next((t.shape[0] for t in tasks if layers.is_input_embedding(t.output)), None)
    if isinstance(tokens, int) and rows is not None and tokens != rows:
        raise RecipeError(
            f"{recipe.tokenizer_source} has a vocabulary of {tokens} tokens but the merged embeddings have {rows} rows; "
            "mergebot copies the tokenizer without remapping embeddings, so pick a tokenizer_source with the same vocabulary",
            field="tokenizer_source",
        )


def _check_calibration(
    recipe: Recipe,
    method: MergeMethod,
    sources: dict[ModelReference, ModelSource],
    calibration: dict[ModelReference, CalibrationSource],
) -> list[str]:
    """A method that needs data gets it for every model it can run; returns notes."""
    given = recipe.calibration or any(m.calibration for m in recipe.models or [])
    if not method.needs_data:
        if given and not recipe.aligns_on_data():
            return [f"{method.name} uses no data: the calibration block is ignored"]
        return []
    if not recipe.models:
        raise RecipeError(
            f"{method.name} merges whole models with their calibration data; list them under 'models', not 'slices'",
            field="slices",
        )
    for i, entry in enumerate(recipe.models):
        where = f"models[{i}]"
        if entry.model not in calibration:
            raise RecipeError(
                f"{method.name} needs calibration data for {entry.model}: add a calibration block to it, or a shared one at the top level",
                field=f"{where}.calibration",
            )
        config = sources[entry.model].config
        task = model_task(config)
        if task is None:
            found = (config.get("architectures") or ["no architecture"])[0]
            raise IncompatibleModelsError(
                f"{method.name} runs each model on its calibration data, which mergebot does for causal LMs and "
                f"sequence classifiers; {entry.model} is {found}"
            )
        if task == "causal_lm" and calibration[entry.model].spec.label_field:
            raise RecipeError(
                f"{entry.model} is a causal LM, which learns from the text itself; remove label_field",
                field=f"{calibration[entry.model].where}.label_field",
            )
    return []


def build_plan(
    recipe: Recipe,
    sources: dict[ModelReference, ModelSource],
    seed: int | None = None,
    calibration: dict[ModelReference, CalibrationSource] | None = None,
) -> MergePlan:
    """Check the recipe against the models' metadata and resolve every output tensor.
    ``calibration`` holds each input model's resolved calibration data (methods that need data)."""
    method = get_method(recipe.merge_method)
    check_parameter_names(recipe, method)
    layout = common_layout(recipe, {ref: s.layout for ref, s in sources.items()})
    check_layout(recipe, layout, method.needs_data, method.name)
    sources = plan_loras(recipe, sources, layout, uses_base=method.base != "unused")
    resolver = TaskResolver(recipe, sources)
    calibration = calibration or {}
    notes = _check_calibration(recipe, method, sources, calibration)
    if (
        method.base == "required"
        and not recipe.base_model
        and not any(s.base_model for s in recipe.slices or [])
    ):
        raise RecipeError(
            f"{method.name} works on differences from a base model; name it in base_model",
            field="base_model",
        )
    if (
        recipe.base_model
        and method.base == "unused"
        and recipe.base_model not in recipe.input_models()
    ):
        notes.append(
            f"{method.name} does not use a base model: {recipe.base_model} only donates config and tokenizer"
        )
    layer_sources = []
    if recipe.models:
        _plan_models(resolver)
    else:
        layer_sources = plan_slices(resolver)
    _check_tokenizer_vocabulary(recipe, sources, resolver.tasks)
    tasks, sources = resolver.tasks, dict(sources)
    if recipe.vae and recipe.vae not in recipe.input_models() and recipe.vae != recipe.base_model:
        sources[recipe.vae] = vae_source(sources[recipe.vae], layout)
    if recipe.vae:
        tasks = bake_vae(tasks, sources[recipe.vae], DTYPES.get(recipe.out_dtype or ""))
    output_format = recipe.output_layout or layout.format
    tasks, writes = plan_writes(tasks, layout, output_format, recipe.discard or [])
    if method.random:
        seed = (
            recipe.random_seed
            if recipe.random_seed is not None
            else (seed if seed is not None else secrets.randbits(31))
        )
    config = (
        output_config(recipe, sources, resolver.tasks, layer_sources)
        if layout == TRANSFORMERS
        else dict(sources[recipe.donor()].config)
    )
    plan = MergePlan(
        recipe,
        method,
        sources,
        tasks,
        config,
        seed,
        notes,
        calibration,
        layout=layout,
        output_format=output_format,
        writes=writes,
    )
    read = [ref for ref in recipe.referenced_models() if ref in plan.read_models]
    plan.alignment = plan_alignment(recipe, sources, read, calibration, method.needs_data)
    return plan
