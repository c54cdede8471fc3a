"""A trial's numbers and what they mean: a merge recipe (parameter space) or a layer path
(data-flow space).

Every gene is a float in its bounds, named so that ``trials.jsonl`` reads on its own
(``weight.m1.mlp.g0``: model 1's weight for tensors matching ``mlp`` in layer group 0). The
search starts at the centre of the bounds (CMA-ES's default mean): for parameters that is the
middle of each range, for a layer path it is the first model's own stack of layers, unscaled.
A layer path's first trials are every source's own stack (:meth:`LayerGenes.starts`), so a
search never ends below a source it contains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from merge_engine.evolve.report import PathSlot
from merge_engine.evolve.spec import LayerGenome, ParameterGenome
from merge_engine.methods import MergeMethod
from merge_engine.recipe.schema import ModelReference, Recipe, parse_recipe

REST = "rest"
"""The filter name of the tensors that match none of the genome's ``filters``."""
DIGITS = 4
"""Decimals a merge parameter keeps: the candidate evaluated and the recipe written both use
the rounded value, and a recipe stays readable."""
INCLUDE_BIAS = 0.5
"""Added to a slot's indicator gene for the first model's first pass, subtracted for every
other slot: the centre of the space is then the first model unchanged."""


@dataclass(frozen=True)
class Gene:
    name: str
    low: float
    high: float


def centre(genes: list[Gene]) -> dict[str, float]:
    """The middle of every gene's bounds: where the search starts."""
    return {g.name: (g.low + g.high) / 2 for g in genes}


@dataclass(frozen=True)
class GeneCount:
    """How many genes a stage's genome has, and the factors that make it (for the sentence
    that refuses too many): counted from the spec and the headers, before any gene exists."""

    total: int
    factors: str


def parameter_gene_count(
    genome: ParameterGenome, searched: int, models: int, num_layers: int
) -> GeneCount:
    """The genes :class:`ParameterGenes` makes: one per (searched parameter, model, filter
    group, layer group)."""
    groups = max(1, math.ceil(num_layers / genome.layers_per_value))
    filters = len(genome.filters) + 1 if genome.filters else 1
    factors = (
        f"{searched} parameters x {models} models x {filters} filter groups x {groups} layer groups"
    )
    return GeneCount(searched * models * filters * groups, factors)


def layer_gene_count(genome: LayerGenome, layers_per_model: list[int]) -> GeneCount:
    """The genes :class:`LayerGenes` makes: one indicator per slot and, with scaling, one
    scale per (layer, layer) pair."""
    count = sum(layers_per_model)
    slots = genome.repeats * count
    scales = count * count if genome.scaling else 0
    factors = f"{slots:,} slots" + (f" + {scales:,} scales" if scales else "")
    return GeneCount(slots + scales, factors)


class ParameterGenes:
    """Per-model parameters of ``method``, one value per (model, parameter, filter, layer group)."""

    def __init__(
        self,
        genome: ParameterGenome,
        method: MergeMethod,
        models: list[ModelReference],
        base: ModelReference | None,
        num_layers: int,
        seed: int,
    ):
        self.genome, self.method, self.models, self.base = genome, method, models, base
        self.num_layers, self.seed = num_layers, seed
        self.search = genome.search or default_search(method)
        self.groups = max(1, math.ceil(num_layers / genome.layers_per_value))
        self.filters = [*genome.filters, REST] if genome.filters else [REST]
        self.genes = [
            Gene(self.gene_name(param, m, f, g), low, high)
            for param, (low, high) in self.search.items()
            for m in range(len(models))
            for f in self.filters
            for g in range(self.groups)
        ]

    def gene_name(self, param: str, model: int, filter_name: str, group: int) -> str:
        parts = [param, f"m{model}"]
        parts += [filter_name] if self.genome.filters else []
        parts += [f"g{group}"] if self.groups > 1 else []
        return ".".join(parts)

    def _setting(self, values: dict[str, float], param: str, model: int) -> Any:
        def per_layer(filter_name: str) -> float | list[float]:
            by_group = [
                round(values[self.gene_name(param, model, filter_name, g)], DIGITS)
                for g in range(self.groups)
            ]
            if self.groups == 1:
                return by_group[0]
            return [
                by_group[layer // self.genome.layers_per_value] for layer in range(self.num_layers)
            ]

        if not self.genome.filters:
            return per_layer(REST)
        entries = [{"filter": f, "value": per_layer(f)} for f in self.genome.filters]
        return [*entries, {"value": per_layer(REST)}]

    def recipe(self, values: dict[str, float]) -> Recipe:
        """The merge recipe these values describe: an ordinary recipe, per-layer values as
        lists (a gradient with one entry per layer), that ``mergebot merge`` reproduces."""
        models = [
            {"model": str(ref), "parameters": {p: self._setting(values, p, m) for p in self.search}}
            for m, ref in enumerate(self.models)
        ]
        return parse_recipe(
            {
                "merge_method": self.method.name,
                "base_model": str(self.base)
                if self.base and self.method.base != "unused"
                else None,
                "models": models,
                "parameters": dict(self.genome.fixed) if self.genome.fixed else None,
                "dtype": self.genome.dtype,
                "random_seed": self.seed if self.method.random else None,
            }
        )

    def uniform_recipe(self) -> Recipe:
        """The baseline a search must beat, the merge one would make without searching: every
        model at weight 1 and, where the method has one, density 0.5; any other searched
        parameter at the centre of its bounds, and the method's defaults for the rest (the
        spec's ``fixed`` values are part of the search, not of the baseline)."""
        values = {}
        for gene in self.genes:
            param = gene.name.split(".")[0]
            values[gene.name] = {"weight": 1.0, "density": 0.5}.get(
                param, (gene.low + gene.high) / 2
            )
        return self.recipe(values).model_copy(update={"parameters": None})


def default_search(method: MergeMethod) -> dict[str, tuple[float, float]]:
    """``weight`` in [0, 1] and, where the method takes it, ``density`` in [0.1, 1]."""
    names = {p.name for p in method.per_model_params}
    search = {"weight": (0.0, 1.0)} if "weight" in names else {}
    if "density" in names:
        search["density"] = (0.1, 1.0)
    return search


@dataclass(frozen=True)
class LayerRef:
    model: int
    layer: int


class LayerGenes:
    """A layer path: ``repeats`` passes over every layer of every model (T slots), one
    indicator per slot, and with ``scaling`` one scale per (previous layer, next layer) pair."""

    def __init__(self, genome: LayerGenome, layers_per_model: list[int]):
        self.genome = genome
        self.layers = [
            LayerRef(m, i) for m, count in enumerate(layers_per_model) for i in range(count)
        ]
        self.slots = [ref for _ in range(genome.repeats) for ref in self.layers]
        first_pass = layers_per_model[0]
        self.bias = [
            INCLUDE_BIAS if t < first_pass else -INCLUDE_BIAS for t in range(len(self.slots))
        ]
        self.genes = [Gene(f"include.{t}", -1.0, 1.0) for t in range(len(self.slots))]
        if genome.scaling:
            low, high = genome.scale_bounds
            count = len(self.layers)
            self.genes += [
                Gene(f"scale.{i}.{j}", low, high) for i in range(count) for j in range(count)
            ]

    def own_path(self, model: int) -> dict[str, float]:
        """Gene values whose path is source ``model`` itself: its own layers once, in order,
        unscaled (a scale of 1 where the bounds allow it), every other slot left out. The first
        model's is the centre of the space."""
        first_pass = len(self.layers)
        values = {}
        for t, ref in enumerate(self.slots):
            wanted = ref.model == model and t < first_pass
            values[f"include.{t}"] = (
                0.0 if wanted == (self.bias[t] > 0) else (1.0 if wanted else -1.0)
            )
        if self.genome.scaling:
            low, high = self.genome.scale_bounds
            values.update(
                {
                    g.name: min(max(1.0, low), high)
                    for g in self.genes
                    if g.name.startswith("scale.")
                }
            )
        return values

    def starts(self) -> list[dict[str, float]]:
        """The trials a search queues first: every source's own path, the first model's (the
        centre, or in a two-stage search the parameter stage's winner) first."""
        models = sorted({ref.model for ref in self.layers})
        return [self.own_path(m) for m in models]

    def path(self, values: dict[str, float]) -> list[tuple[LayerRef, float]]:
        """The included slots in order, each with the scale of its input (the first slot's
        input is the embeddings: unscaled), cut at ``max_length``. A path is never empty: when
        no slot is included, the one closest to inclusion is."""
        chosen = [t for t in range(len(self.slots)) if values[f"include.{t}"] + self.bias[t] > 0]
        if not chosen:
            chosen = [
                max(range(len(self.slots)), key=lambda t: values[f"include.{t}"] + self.bias[t])
            ]
        chosen = chosen[: self.genome.max_length or len(chosen)]
        index = {ref: i for i, ref in enumerate(self.layers)}
        path = []
        for k, t in enumerate(chosen):
            scale = 1.0
            if k and self.genome.scaling:
                gene = f"scale.{index[self.slots[chosen[k - 1]]]}.{index[self.slots[t]]}"
                scale = round(values[gene], DIGITS)
            path.append((self.slots[t], scale))
        return path


def path_slots(path: list[tuple[LayerRef, float]], labels: list[str]) -> list[PathSlot]:
    """The path as the report draws it."""
    return [PathSlot(labels[ref.model], ref.layer, scale) for ref, scale in path]
