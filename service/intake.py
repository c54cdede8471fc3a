"""A merge request, as every origin (form, discussion, schedule, API) hands it in, and the
checks the service adds to the engine's: a request may name only Hub repos, within size
limits, and its job id is a hash of what it will produce, so a repeat finds the same job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from merge_engine.errors import RecipeError, excerpt
from merge_engine.hub_names import check_repo_id, check_revision
from merge_engine.plan import MergePlan
from merge_engine.recipe import Recipe

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


@dataclass(frozen=True)
class Limits:
    max_models: int = 8
    max_source_bytes: int = 100 * 10**9


def check_hub_only(recipe: Recipe) -> None:
    """Refuse any reference that is not ``org/name`` or ``org/name@revision`` by the Hub's own
    rules: a request must never make the server read its own files (a path, ``..``, a URL),
    and a name the Hub would refuse is one sentence now, not a failure later."""
    for ref in recipe.referenced_models():
        if not _looks_like_hub_repo(ref.path):
            raise RecipeError(
                f"{excerpt(str(ref))} is not a Hub model; requests to the bot may name only Hub repos as org/name or org/name@revision",
                field="models",
            )
        # what the engine took for a local folder was not checked when the recipe was read
        check_repo_id(ref.path, "model", field="models")
        if ref.revision is not None:
            check_revision(ref.revision, field="models")


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


def check_model_count(recipe: Recipe, limits: Limits) -> None:
    """The number of models, from the recipe alone: refused before any Hub call."""
    count = len(recipe.referenced_models())
    if count > limits.max_models:
        raise RecipeError(
            f"the recipe reads {count} models, more than the {limits.max_models} this bot merges per request; merge fewer at a time",
            field="models",
        )


def check_limits(plan: MergePlan, limits: Limits) -> None:
    """Size limits from the pre-flight (headers only), before any download."""
    size = sum(info.nbytes for source in plan.sources.values() for info in source.tensors.values())
    if size > limits.max_source_bytes:
        raise RecipeError(
            f"the source models hold {size / 1e9:.1f} GB of weights, more than the {limits.max_source_bytes / 1e9:.0f} GB limit of this bot",
            field="models",
        )


def job_id(plan: MergePlan, request: MergeRequest) -> str:
    """Hash of the normalised recipe with every source pinned, the target and what else shapes
    the result (private or public, followed or not): the same request at the same source
    revisions is the same job, and asking for a private copy is not."""
    recipe = plan.pinned_recipe()
    normalised = json.dumps(
        {
            "recipe": recipe.model_dump(mode="json", exclude_none=True),
            "target": request.target,
            "private": request.private,
            "follow_sources": request.follow_sources,
        },
        sort_keys=True,
    )
    return "job-" + hashlib.sha256(normalised.encode()).hexdigest()[:24]
