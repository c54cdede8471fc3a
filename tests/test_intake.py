"""What the service checks on top of the engine: Hub-only references, targets, size limits,
and a job id that is the same exactly when the merge would be the same."""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_engine.errors import RecipeError
from merge_engine.io import TensorInfo
from merge_engine.plan import build_plan
from merge_engine.recipe import ModelReference, parse_recipe
from merge_engine.sources import ModelSource
from service.intake import Limits, check_hub_only, check_limits, check_target, job_id

RECIPE = "merge_method: ties\nbase_model: org/base\nmodels: [{model: org/math, parameters: {weight: 1, density: 0.5}}]\n"


def plan(text: str = RECIPE, revisions: dict[str, str] | None = None):
    recipe = parse_recipe(yaml.safe_load(text))
    revisions = revisions or {}
    sources = {}
    for ref in recipe.referenced_models():
        tensors = {"model.layers.0.w": torch.zeros(4, 4)}
        infos = {n: TensorInfo((4, 4), torch.float32, "m") for n in tensors}
        sources[ref] = ModelSource(
            ref, {}, infos, revision=revisions.get(ref.path, "a" * 40), memory=tensors
        )
    return build_plan(recipe, sources)


@pytest.mark.parametrize(
    "reference",
    [
        "/etc/models",
        "../secrets/model",
        "./local",
        "https://evil.example/org/model",
        "org/../../etc",
        "org/name@../x",
    ],
)
def test_a_request_may_name_only_hub_repos(reference):
    recipe = parse_recipe(
        {"merge_method": "linear", "models": [{"model": ModelReference.parse(reference)}]}
    )
    with pytest.raises(RecipeError, match="requests to the bot may name only Hub repos"):
        check_hub_only(recipe)


def test_hub_references_pass():
    check_hub_only(parse_recipe(yaml.safe_load(RECIPE.replace("org/math", "org/math@v1.0"))))


@pytest.mark.parametrize("target", ["alice", "alice/", "../alice/x", "alice/x/y"])
def test_bad_targets_are_refused(target):
    with pytest.raises(RecipeError, match="is not a repo name; write namespace/name"):
        check_target(target)


def test_size_limits_are_checked_from_headers():
    with pytest.raises(RecipeError, match="the recipe reads 2 models, more than the 1"):
        check_limits(plan(), Limits(max_models=1))
    with pytest.raises(RecipeError, match="more than the 0 GB limit"):
        check_limits(plan(), Limits(max_source_bytes=100))
    check_limits(plan(), Limits())


def test_job_id_is_stable_for_the_same_merge_and_changes_with_revision_or_target():
    same = "models: [{parameters: {density: 0.5, weight: 1}, model: org/math}]\nbase_model: org/base\nmerge_method: ties\n"
    assert job_id(plan(), "alice/merged") == job_id(plan(same), "alice/merged")
    assert job_id(plan(), "alice/merged") != job_id(plan(), "alice/other")
    assert job_id(plan(), "alice/merged") != job_id(
        plan(revisions={"org/math": "b" * 40}), "alice/merged"
    )
