"""The search spec: which models, which space, which genome, which fitness, how much budget.

A spec is YAML read with the recipe's bounded safe loader and validated with the recipe's
one-sentence errors (the field and the fix). The shape of the YAML only; whether the method
takes the searched parameters, whether the sources fit together and whether the data has the
fields a task reads is checked against the registry and the models' headers by
:mod:`merge_engine.evolve.checks`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_engine.errors import RecipeError, excerpt
from merge_engine.recipe.limits import DEFAULT_LIMITS, RecipeLimits, check_examples, load_yaml
from merge_engine.recipe.schema import (
    DTYPES,
    Calibration,
    DataBlock,
    ModelReference,
    Parameters,
    first_error,
)

SPACES = ("parameters", "layers", "both")
BUILT_IN_KINDS = ("multiple_choice", "exact_match", "nll", "classification")
"""Task kinds scored by mergebot's own evaluators over examples (what the bot runs)."""
TASK_KINDS = (*BUILT_IN_KINDS, "lm_eval")
TASK_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9])?")
"""What a fitness task may be called: it heads a column of the card's table."""
FOLDABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose layer-path scales fold exactly into the weights (see docs/evolve.md)."""


SEEDS = 2**32
"""Seeds are in [0, 2^32), what NumPy's generator (CMA-ES's) takes."""
MAX_POPULATION = 1000
"""CMA-ES keeps a population of candidates in memory; a larger one than this never completes
a generation within any budget a search runs."""
SCALE_RANGE = (0.01, 100.0)
"""Scales of a layer path: a path multiplies them along its slots, so wider ones overflow or
vanish in the written weights."""
MAX_WEIGHT = 1e6
MAX_BATCH_SIZE = 256
MAX_TOKENS = 8192
"""Tokens a task's sequence keeps (``max_length``)."""
MAX_SAMPLES = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


Bounds = tuple[float, float]


def _ordered(value: Bounds) -> Bounds:
    low, high = value
    if not low < high:
        raise ValueError(f"bounds [{low:g}, {high:g}] are empty; write [low, high] with low < high")
    return value


class Source(_Strict):
    model: ModelReference


class ParameterGenome(_Strict):
    """Parameter space: a ``method`` merge whose per-model parameters in ``search`` are searched
    within their bounds, one value per group of ``layers_per_value`` layers, and one per
    tensor-name ``filters`` entry (the rest share another); ``fixed`` are the method's other
    parameters, as in a recipe's top-level ``parameters``."""

    method: str = "ties"
    search: dict[str, Bounds] | None = None
    fixed: Parameters | None = None
    layers_per_value: int = Field(default=1, gt=0)
    filters: list[str] = Field(default_factory=list)
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]

    @field_validator("filters")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        """A repeated filter would be a second set of genes that no tensor reads (a tensor
        takes the first filter it matches): refused, as a repeated model is."""
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"filter {excerpt(name)} is listed twice; list each filter once")
            seen.add(name)
        return value

    @field_validator("search")
    @classmethod
    def _bounds(cls, value: dict[str, Bounds] | None) -> dict[str, Bounds] | None:
        if value is not None and not value:
            raise ValueError("'search' is empty; name at least one parameter with its bounds")
        for bounds in (value or {}).values():
            _ordered(bounds)
        return value


class LayerGenome(_Strict):
    """Data-flow space: every layer of every model laid out in order and repeated ``repeats``
    times; a slot's indicator includes its layer; with ``scaling``, the input of layer j is
    scaled when the path arrives from layer i (within ``scale_bounds``)."""

    repeats: int = Field(default=2, gt=0, le=8)
    max_length: int | None = Field(default=None, gt=0, le=100_000)
    scaling: bool = True
    scale_bounds: Bounds = (0.5, 1.5)

    @field_validator("scale_bounds")
    @classmethod
    def _positive(cls, value: Bounds) -> Bounds:
        _ordered(value)
        low, high = SCALE_RANGE
        if value[0] < low or value[1] > high:
            raise ValueError(
                f"scales must lie in [{low:g}, {high:g}], got [{value[0]:g}, {value[1]:g}]; a path multiplies them, so keep them near 1"
            )
        return value


class TaskData(DataBlock):
    """Examples of one split, from a ``path``, a Hub ``dataset`` or inline ``examples``;
    ``samples`` of them are drawn with ``seed`` (all, in order, when not given)."""

    samples: int | None = Field(default=None, gt=0, le=MAX_SAMPLES)
    seed: int = Field(default=0, ge=0, lt=SEEDS)

    def as_calibration(self, text_field: str) -> Calibration:
        """The same data as a calibration block, to pin, fetch and read it the same way."""
        return Calibration(
            path=self.path,
            dataset=self.dataset,
            file=self.file,
            examples=self.examples,
            text_field=text_field,
        )


class FitnessTask(_Strict):
    """One task of the fitness: its kind, its weight in the total, its search data and its
    held-out data (else ``held_out_fraction`` of the search data, drawn with the data's seed),
    and the fields its examples hold. An ``lm_eval`` task instead names an lm-evaluation-harness
    task YAML in ``task``, which holds its data, prompts and ``metric`` (else its first)."""

    kind: Literal[TASK_KINDS]  # type: ignore[valid-type]
    name: str | None = None
    weight: float = Field(default=1.0, gt=0, le=MAX_WEIGHT)
    data: TaskData | None = None
    task: str | None = None
    metric: str | None = None
    held_out: TaskData | None = None
    held_out_fraction: float = Field(default=0.25, gt=0, lt=1)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    choices_field: str = "choices"
    text_field: str = "text"
    label_field: str = "label"
    max_new_tokens: int = Field(default=16, gt=0, le=512)
    max_length: int = Field(default=256, gt=1, le=MAX_TOKENS)
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH_SIZE)  # None: from the model

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        """A task's name heads a column of the card's fitness table and labels its scores:
        it is held to an alphabet that no Markdown or HTML reads as markup."""
        if value is not None and not TASK_NAME.fullmatch(value):
            raise ValueError(
                f"task name {excerpt(value)} must be 1 to 64 ASCII letters, digits, spaces, '_', '.' or '-', starting and ending with a letter or digit; rename the task"
            )
        return value

    @model_validator(mode="after")
    def _data_or_task_file(self) -> FitnessTask:
        """An lm-eval task brings its data in its YAML; every other kind reads ``data``."""
        if self.kind == "lm_eval":
            if self.task is None:
                raise ValueError(
                    "an lm_eval task needs 'task': the path of an lm-evaluation-harness task YAML"
                )
            for given in ("data", "held_out"):
                if getattr(self, given) is not None:
                    raise ValueError(
                        f"an lm_eval task reads its data from its task YAML; remove '{given}' and name the data in the YAML's dataset_path"
                    )
        else:
            if self.data is None:
                raise ValueError(
                    f"a {self.kind} task needs 'data': a path, a Hub dataset or inline examples"
                )
            for given in ("task", "metric"):
                if getattr(self, given) is not None:
                    raise ValueError(
                        f"'{given}' belongs to lm_eval tasks; remove it, or set kind: lm_eval"
                    )
        return self

    def fields(self) -> list[tuple[str, str]]:
        """(option, field name) of each field the task reads from an example (none for an
        lm-eval task: its YAML's templates read them)."""
        if self.kind == "lm_eval":
            return []
        options = {
            "multiple_choice": ("prompt_field", "choices_field", "answer_field"),
            "exact_match": ("prompt_field", "answer_field"),
            "nll": ("text_field",),
            "classification": ("text_field", "label_field"),
        }[self.kind]
        return [(option, getattr(self, option)) for option in options]


class Budget(_Strict):
    """How much search: ``trials`` evaluated candidates (per stage with ``space: both``), the
    CMA-ES ``population`` (default: the library's 4 + 3 ln n) and a ``wall_time`` limit
    (seconds, or 90s, 30m, 2h)."""

    trials: int = Field(gt=0)
    population: int | None = Field(default=None, ge=4, le=MAX_POPULATION)
    wall_time: float | None = Field(default=None, gt=0)

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            # stripped first: two \s* around an optional unit backtracked quadratically
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", value.strip())
            if not match:
                raise ValueError(
                    f"{excerpt(value)} is not a duration; write e.g. 600, 90s, 30m or 2h"
                )
            return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
        return value


class SearchSpec(_Strict):
    space: Literal[SPACES]  # type: ignore[valid-type]
    models: list[Source] = Field(min_length=1)
    base_model: ModelReference | None = None
    parameters: ParameterGenome | None = None
    layers: LayerGenome | None = None
    fitness: list[FitnessTask] = Field(default_factory=list)
    """The tasks; empty only when the Python API is given a fitness function instead."""
    budget: Budget
    seed: int = Field(default=0, ge=0, lt=SEEDS)

    @model_validator(mode="after")
    def _genomes(self) -> SearchSpec:
        if self.space in ("parameters", "both") and self.parameters is None:
            self.parameters = ParameterGenome()
        if self.space in ("layers", "both") and self.layers is None:
            self.layers = LayerGenome()
        seen: set = set()
        for ref in (s.model for s in self.models):
            if ref in seen:
                raise ValueError(f"model {ref} is listed twice; list each model once")
            seen.add(ref)
        seen = set()
        for name in self.task_names():
            if name in seen:
                raise ValueError(
                    f"two fitness tasks are called {name!r}; give each a distinct 'name'"
                )
            seen.add(name)
        return self

    def sources(self) -> list[ModelReference]:
        return [s.model for s in self.models]

    def stages(self) -> list[str]:
        """The studies the search runs, in order: each takes ``budget.trials`` trials."""
        return {
            "parameters": ["parameters"],
            "layers": ["layers"],
            "both": ["parameters", "layers"],
        }[self.space]

    def total_trials(self) -> int:
        """The trials of every stage together."""
        return self.budget.trials * len(self.stages())

    def referenced_models(self) -> list[ModelReference]:
        """Every model the search reads: the base first, then the sources."""
        return list(
            dict.fromkeys([*([self.base_model] if self.base_model else []), *self.sources()])
        )

    def task_names(self) -> list[str]:
        return [task.name or task.kind for task in self.fitness]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def fingerprint(self) -> str:
        """What names the search's study: the same spec, the same study, wherever it runs."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


def parse_spec(data: Any) -> SearchSpec:
    """Validate a spec given as a mapping; every error names the field and the fix."""
    if not isinstance(data, dict):
        raise RecipeError(
            "a search spec must be a YAML mapping with 'space', 'models', 'fitness' and 'budget'"
        )
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, "search spec", blocks=("fixed",)) from None


def spec_from_text(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> SearchSpec:
    """Read a spec from YAML text within ``limits`` (the recipe's)."""
    spec = parse_spec(load_yaml(text, limits))
    for i, task in enumerate(spec.fitness):
        for split in ("data", "held_out"):
            block = getattr(task, split)
            if block is not None and block.examples:
                check_examples(block.examples, f"fitness[{i}].{split}", limits)
    return spec


def load_spec(path: str | Path, limits: RecipeLimits = DEFAULT_LIMITS) -> SearchSpec:
    """Read a spec from a YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"search spec {path} is not UTF-8 text; save it as UTF-8") from None
    except (OSError, ValueError):
        raise RecipeError(
            f"search spec {excerpt(str(path), 200)} does not exist or cannot be read; check the path"
        ) from None
    return spec_from_text(text, limits)
