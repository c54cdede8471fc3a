"""The spec against the method registry, the models' configs and headers and the task data:
every refusal before a weight is read or a file written, one sentence naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.evolve.candidates import folded_recipe
from merge_engine.evolve.fitness import read_tasks
from merge_engine.evolve.genome import (
    GeneCount,
    LayerGenes,
    ParameterGenes,
    centre,
    default_search,
    layer_gene_count,
    parameter_gene_count,
)
from merge_engine.evolve.lm_eval_tasks import check_task_files
from merge_engine.evolve.spec import FOLDABLE_FAMILIES, SearchSpec
from merge_engine.evolve.task_rows import TaskRows
from merge_engine.methods import MergeMethod, get_method
from merge_engine.plan.planner import build_plan
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.inspection import ModelSource, inspect_recipe_models, model_task


@dataclass
class CheckedSpec:
    spec: SearchSpec
    sources: dict[ModelReference, ModelSource]
    method: MergeMethod | None
    layers_per_model: list[int]
    tasks: list[TaskRows]


def check_spec(
    spec: SearchSpec,
    *,
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
    own_fitness: bool = False,
    max_genes: int | None = None,
) -> CheckedSpec:
    """Everything that can be checked without weights; ``own_fitness``: the caller scores the
    candidates itself, so the spec needs no tasks; ``max_genes``: the most genes one stage may
    search (CMA-ES's work per trial grows with the cube of it), counted from the headers
    before any gene is made."""
    check_task_files(spec.fitness, hub_only)  # files on this machine, before the Hub is asked
    sources = inspect_recipe_models(
        spec.referenced_models(), token, hub_only=hub_only, cache_dir=cache_dir
    )
    refs = spec.sources()
    layers = [sources[ref].num_layers or 0 for ref in refs]
    method = (
        _check_parameters(spec, sources, layers[0], max_genes)
        if spec.parameters and spec.space != "layers"
        else None
    )
    if spec.space in ("layers", "both"):
        _check_layer_path(spec, sources, layers, max_genes)
    if not spec.fitness and not own_fitness:
        raise RecipeError("is required; list at least one task with its data", field="fitness")
    _check_loadable(spec, sources)
    _check_task_models(spec, sources)
    _check_tokenizer(spec, sources)
    tasks = (
        []
        if own_fitness and not spec.fitness
        else read_tasks(spec.fitness, token, hub_only, cache_dir)
    )
    return CheckedSpec(spec, sources, method, layers, tasks)


def _check_gene_count(
    count: GeneCount, stage: str, field: str, fix: str, limit: int | None
) -> None:
    if limit is not None and count.total > limit:
        raise RecipeError(
            f"the {stage} has {count.total:,} genes ({count.factors}), more than the {limit:,} allowed; {fix}",
            field=field,
        )


def _check_parameters(
    spec: SearchSpec,
    sources: dict[ModelReference, ModelSource],
    num_layers: int,
    max_genes: int | None,
) -> MergeMethod:
    genome = spec.parameters
    try:
        method = get_method(genome.method)
    except RecipeError as error:
        raise RecipeError(
            str(error).removeprefix("merge_method: "), field="parameters.method"
        ) from None
    if method.layer_stacking or method.needs_data:
        raise RecipeError(
            f"{method.name} cannot be searched here; choose a method that merges whole models without data, such as ties, dare_ties, task_arithmetic or linear",
            field="parameters.method",
        )
    if method.base == "required" and spec.base_model is None:
        raise RecipeError(
            f"{method.name} works on differences from a base model; name it in base_model",
            field="base_model",
        )
    per_model = {p.name: p for p in method.per_model_params if p.type is float}
    for name, (low, high) in (genome.search or default_search(method)).items():
        where = f"parameters.search.{name}"
        if name not in per_model:
            searchable = ", ".join(per_model) or "nothing"
            raise RecipeError(
                f"'{name}' is not a per-model number of {method.name}; it can search {searchable}",
                field=where,
            )
        for bound in (low, high):
            try:
                per_model[name].coerce(bound, where)
            except RecipeError:
                raise RecipeError(
                    f"bound {bound:g} is outside {name}'s range {per_model[name].bounds_text()}; keep both bounds inside it",
                    field=where,
                ) from None
    searched = len(genome.search or default_search(method))
    _check_gene_count(
        parameter_gene_count(genome, searched, len(spec.sources()), num_layers),
        "parameter search",
        "parameters.filters" if genome.filters else "parameters.layers_per_value",
        "use fewer filters, a larger layers_per_value or fewer parameters in search",
        max_genes,
    )
    names = sources[spec.sources()[0]].tensors
    for i, name in enumerate(genome.filters):
        if not any(name in tensor for tensor in names):
            raise RecipeError(
                f"{name!r} matches no tensor of {spec.sources()[0]}; a filter is part of a tensor name, such as self_attn or mlp",
                field=f"parameters.filters[{i}]",
            )
    genes = ParameterGenes(genome, method, spec.sources(), spec.base_model, num_layers, spec.seed)
    build_plan(genes.recipe(centre(genes.genes)), sources)  # shapes, layers, fixed parameters
    return method


def _check_layer_path(
    spec: SearchSpec,
    sources: dict[ModelReference, ModelSource],
    layers: list[int],
    max_genes: int | None,
) -> None:
    for i, ref in enumerate(spec.sources()):
        family = sources[ref].config.get("model_type")
        if family not in FOLDABLE_FAMILIES:
            raise RecipeError(
                f"{ref} is a {family or 'model without a model_type'} model; a layer path folds its scales into the weights "
                f"only in pre-norm families whose RMSNorm ignores the scale of its input ({', '.join(FOLDABLE_FAMILIES)}); "
                "search space: parameters instead",
                field=f"models[{i}].model",
            )
        if model_task(sources[ref].config) != "causal_lm":
            raise IncompatibleModelsError(f"a layer path runs causal LMs; {ref} is not one")
    tied = {bool(sources[ref].config.get("tie_word_embeddings", False)) for ref in spec.sources()}
    if len(tied) > 1:
        raise IncompatibleModelsError(
            "some sources tie their output head to the input embedding and some do not; a layer path "
            "takes the embeddings of its first model and the head of its last, so use sources that agree"
        )
    # with space: both, the parameter stage's winner joins the sources (as deep as the first)
    searched = [layers[0], *layers] if spec.space == "both" else layers
    _check_gene_count(
        layer_gene_count(spec.layers, searched),
        "layer path",
        "layers.scaling" if spec.layers.scaling else "layers.repeats",
        "turn scaling off, lower repeats, or search fewer or shallower models",
        max_genes,
    )
    genes = LayerGenes(spec.layers, layers)
    every_layer = [(ref, 1.0) for ref in genes.layers]
    build_plan(folded_recipe(every_layer, spec.sources()), sources)  # one shape for all


def _check_loadable(spec: SearchSpec, sources: dict[ModelReference, ModelSource]) -> None:
    """A search runs its models, so transformers must know their family (without remote code)
    and they must be causal LMs or sequence classifiers."""
    from transformers import CONFIG_MAPPING

    for ref in spec.referenced_models():
        config = sources[ref].config
        family = config.get("model_type")
        where = "base_model" if ref == spec.base_model and ref not in spec.sources() else None
        where = where or f"models[{spec.sources().index(ref)}].model"
        if sources[ref].layout != TRANSFORMERS:
            raise RecipeError(
                f"{ref} is {sources[ref].layout}; a search runs its models on text tasks, which "
                "mergebot does for causal LMs and sequence classifiers",
                field=where,
            )
        if family not in CONFIG_MAPPING:
            raise IncompatibleModelsError(
                f"{ref} is a {family or 'model without a model_type'} model, which this transformers cannot load without remote code; "
                "a search runs its models, so use a family transformers knows (or upgrade transformers)"
            )
        if model_task(config) is None:
            found = (config.get("architectures") or ["no architecture"])[0]
            raise RecipeError(
                f"{ref} is {found}; a search runs causal LMs and sequence classifiers", field=where
            )


def _check_task_models(spec: SearchSpec, sources: dict[ModelReference, ModelSource]) -> None:
    for i, task in enumerate(spec.fitness):
        wanted = "classification" if task.kind == "classification" else "causal_lm"
        for ref in spec.sources():
            if model_task(sources[ref].config) != wanted:
                kind = (
                    "sequence classifiers"
                    if wanted == "classification"
                    else "causal language models"
                )
                raise RecipeError(
                    f"a {task.kind} task scores {kind}, and {ref} is not one; choose another task kind",
                    field=f"fitness[{i}].kind",
                )


def _check_tokenizer(spec: SearchSpec, sources: dict[ModelReference, ModelSource]) -> None:
    """Every task tokenizes its text with the first source's tokenizer: a source without
    tokenizer files is refused here, from the file list, rather than after the weights load."""
    first, *others = spec.sources()
    if not spec.fitness or sources[first].has_tokenizer is not False:
        return
    donor = next((ref for ref in others if sources[ref].has_tokenizer), None)
    fix = (
        f"list {donor}, which has them, first in models"
        if donor
        else "save the model's tokenizer into it (tokenizer.save_pretrained) and check again"
    )
    raise RecipeError(
        f"the {spec.task_names()[0]!r} task tokenizes its text with the tokenizer of the first "
        f"model, {first}, which has no tokenizer files (tokenizer.json, tokenizer_config.json, "
        f"...); {fix}",
        field="fitness[0]",
    )


__all__ = ["CheckedSpec", "check_spec"]
