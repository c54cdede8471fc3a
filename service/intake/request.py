"""A merge or search request, as every origin (form, discussion, schedule, API) hands it in,
and the checks the service adds to the engine's: a request may name only Hub repos and
datasets, within size and budget limits, and its job id is a hash of what it will produce, so
a repeat finds the same job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from merge_engine.errors import RecipeError, excerpt
from merge_engine.evolve.lm_eval_tasks import check_task_files
from merge_engine.evolve.spec import SearchSpec
from merge_engine.plan.kinds import Plan
from merge_engine.recipe.hub_names import check_repo_id, check_revision
from merge_engine.recipe.schema import DataBlock, ModelReference, Recipe
from merge_engine.sources.inspection import ModelSource
from service.disk import source_bytes
from service.settings import Limits, SearchLimits, SearchUse

Origin = Literal["form", "discussion", "schedule", "api"]


@dataclass(frozen=True)
class MergeRequest:
    recipe: Recipe
    target: str
    """The repo to push to, ``namespace/name``."""
    requester: str | None
    origin: Origin
    private: bool = False
    follow_sources: bool = False
    discussion: str | None = None
    """``type/namespace/name#num`` when a Hub discussion asked for it."""
    changes: tuple[str, ...] = ()
    """For a re-merge: the sources that moved."""


@dataclass(frozen=True)
class SearchRequest:
    """An evolutionary search whose winner is pushed to ``target``."""

    spec: SearchSpec
    target: str
    requester: str | None
    origin: Origin
    private: bool = False
    discussion: str | None = None


ANONYMOUS = "(anonymous)"
"""The requester of requests without sign-in: parentheses keep it apart from every Hub
username, so no account can speak for anonymous jobs."""


@dataclass(frozen=True)
class Identity:
    """Who asks: a Hub user proven by their token, or someone known only by name (a discussion
    author, a scheduled re-merge) or not at all, who has no token the bot may use."""

    name: str | None = None
    token: str | None = field(default=None, repr=False)
    orgs: tuple[str, ...] = ()

    @property
    def requester(self) -> str:
        return self.name or ANONYMOUS


SEARCH_KEYS = ("space", "fitness", "budget")


def is_search_spec(document: Any) -> bool:
    """Whether a YAML document asks for a search rather than a merge: a mapping with a key
    that only search specs have (a recipe's are ``merge_method``, ``models``, ``slices``...)."""
    return isinstance(document, dict) and any(key in document for key in SEARCH_KEYS)


def check_hub_only(document: Recipe | SearchSpec) -> None:
    """Refuse any reference that is not ``org/name`` or ``org/name@revision`` by the Hub's own
    rules, and any local data file, whether the merge would read it or not: a request must
    never make the server read its own files (a path, ``..``, a URL) nor publish their paths,
    and a name the Hub would refuse is one sentence now, not a failure later."""
    for where, ref in _named_models(document):
        _check_hub_model(ref, where)
    if isinstance(document, SearchSpec):
        check_task_files(document.fitness, hub_only=True)  # a task YAML names a file too
    for where, block, what in _data_blocks(document):
        if block is not None and block.path is not None:
            raise RecipeError(
                f"a file on the server cannot be read here, and is refused even where nothing would read it; put the {what} in a Hub dataset repo or inline 'examples'",
                field=f"{where}.path",
            )


def _named_models(document: Recipe | SearchSpec) -> list[tuple[str, ModelReference]]:
    """(field, reference) of every model a request names, used or not; the fields that name
    one model first, so that their refusal names them."""
    named: list[tuple[str, ModelReference]] = []
    if isinstance(document, Recipe):
        named += [("vae", document.vae)] if document.vae else []
        if isinstance(document.tokenizer_source, ModelReference):
            named += [("tokenizer_source", document.tokenizer_source)]
        if document.align is not None and document.align.reference is not None:
            named += [("align.reference", document.align.reference)]
    return named + [("models", ref) for ref in document.referenced_models()]


def _data_blocks(document: Recipe | SearchSpec) -> list[tuple[str, DataBlock | None, str]]:
    """(field, block, what it holds) of every data block a request gives, used or not."""
    if isinstance(document, SearchSpec):
        return [
            (f"fitness[{i}].{split}", getattr(task, split), "task data")
            for i, task in enumerate(document.fitness)
            for split in ("data", "held_out")
        ]
    blocks = [("calibration", document.calibration, "calibration data")]
    blocks += [
        (f"models[{i}].calibration", model.calibration, "calibration data")
        for i, model in enumerate(document.models or [])
    ]
    return blocks


def _check_hub_model(ref: ModelReference, field: str) -> None:
    """Each part of ``ref`` (a model, and the adapter of ``base+adapter``) is a Hub repo."""
    for part in ref.parts():
        if not _looks_like_hub_repo(part.path):
            raise RecipeError(
                f"{excerpt(str(part))} is not a Hub model; requests to the bot may name only Hub repos as org/name or org/name@revision",
                field=field,
            )
        # what the engine took for a local folder was not checked when the recipe was read
        check_repo_id(part.path, "model", field=field)
        if part.revision is not None:
            check_revision(part.revision, field=field)


def _looks_like_hub_repo(path: str) -> bool:
    """One slash between two names, no path or URL syntax (what the name rules then check)."""
    return path.count("/") == 1 and not path.startswith(("/", ".", "~")) and "://" not in path


def check_target(target: str) -> None:
    """The repo to push to: ``namespace/name`` as the Hub accepts it."""
    check_repo_id(target, "target", field="target")


def check_push_rights(target: str, identity: Identity, bot_namespace: str | None) -> None:
    """A requester's token pushes to the requester's namespaces; the bot's token only to the
    bot's namespace, for requests that come without a token."""
    namespace = target.split("/")[0]
    if identity.token:
        allowed = (identity.name, *identity.orgs)
        if namespace not in allowed:
            raise RecipeError(
                f"you can push to {' or '.join(f'{n}/...' for n in allowed)}, not to {namespace}/; change the target",
                field="target",
            )
        return
    if bot_namespace is None:
        raise RecipeError(
            "this bot has no namespace of its own; sign in with a Hugging Face token to push to your namespace",
            field="target",
        )
    if namespace != bot_namespace:
        raise RecipeError(
            f"without a token the bot pushes only to {bot_namespace}/...; sign in to push to {namespace}/, or change the target",
            field="target",
        )


def check_model_count(recipe: Recipe | SearchSpec, limits: Limits) -> None:
    """The number of models, from the recipe alone: refused before any Hub call."""
    count = len(recipe.referenced_models())
    if count > limits.max_models:
        raise RecipeError(
            f"the recipe reads {count} models, more than the {limits.max_models} this bot merges per request; merge fewer at a time",
            field="models",
        )


def check_limits(sources: Mapping[ModelReference, ModelSource], limits: Limits) -> None:
    """Size limits from the pre-flight (headers only), before any download."""
    size = source_bytes(sources)
    if size > limits.max_source_bytes:
        raise RecipeError(
            f"the source models hold {size / 1e9:.1f} GB of weights, more than the {limits.max_source_bytes / 1e9:.0f} GB limit of this bot",
            field="models",
        )


def with_wall_time(spec: SearchSpec, limits: SearchLimits) -> SearchSpec:
    """A spec without ``wall_time`` runs for at most this bot's time per search."""
    if spec.budget.wall_time is not None:
        return spec
    budget = spec.budget.model_copy(update={"wall_time": limits.max_hours * 3600})
    return spec.model_copy(update={"budget": budget})


def check_search_limits(spec: SearchSpec, limits: SearchLimits) -> None:
    """A search's own budget within this bot's limits per search, from the spec alone."""
    tasks = len(spec.fitness)
    if tasks > limits.max_tasks:
        raise RecipeError(
            f"the search has {tasks:,} fitness tasks, more than the {limits.max_tasks} this bot scores per trial; merge tasks or drop some",
            field="fitness",
        )
    trials = spec.total_trials()
    if trials > limits.max_trials:
        raise RecipeError(
            f"the search asks for {trials} trials, more than the {limits.max_trials} this bot runs per search; ask for fewer trials",
            field="budget.trials",
        )
    hours = (spec.budget.wall_time or 0) / 3600
    if hours > limits.max_hours:
        raise RecipeError(
            f"the search asks for {_hours(hours)} of wall time, more than the {_hours(limits.max_hours)} this bot gives one search; shorten budget.wall_time",
            field="budget.wall_time",
        )


def check_daily_search_limits(
    spec: SearchSpec, earlier: SearchUse, requester: str, limits: SearchLimits
) -> None:
    """``spec`` and the ``earlier`` searches of ``requester`` in the last day within this
    bot's daily limits per requester."""
    trials = spec.total_trials() + earlier.trials
    if trials > limits.daily_trials:
        raise RecipeError(
            f"{requester} would run {trials} search trials today, more than the {limits.daily_trials} this bot runs per requester per day; ask for fewer trials or wait a day",
            field="budget.trials",
        )
    hours = ((spec.budget.wall_time or 0) + earlier.seconds) / 3600
    if hours > limits.daily_hours:
        raise RecipeError(
            f"{requester} would search for {_hours(hours)} today, more than the {_hours(limits.daily_hours)} this bot gives a requester per day; shorten budget.wall_time or wait a day",
            field="budget.wall_time",
        )


def _hours(hours: float) -> str:
    return f"{hours:g} h" if hours >= 1 else f"{hours * 60:g} min"


def search_job_id(spec: SearchSpec, request: SearchRequest) -> str:
    """Hash of the pinned spec, the target and whether the result is private."""
    return _hashed_id(
        "search",
        spec=spec.model_dump(mode="json", exclude_none=True),
        target=request.target,
        private=request.private,
    )


def job_id(plan: Plan, request: MergeRequest) -> str:
    """Hash of the normalised recipe with every source pinned, the target and what else shapes
    the result (private or public, followed or not): the same request at the same source
    revisions is the same job, and asking for a private copy is not."""
    return _hashed_id(
        "job",
        recipe=plan.pinned_recipe().model_dump(mode="json", exclude_none=True),
        target=request.target,
        private=request.private,
        follow_sources=request.follow_sources,
    )


def _hashed_id(prefix: str, **fields: Any) -> str:
    """``prefix-`` and 24 hex digits of the SHA-256 of ``fields`` as sorted JSON."""
    normalised = json.dumps(fields, sort_keys=True)
    return f"{prefix}-" + hashlib.sha256(normalised.encode()).hexdigest()[:24]
