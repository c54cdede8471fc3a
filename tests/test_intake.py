"""What the service checks on top of the engine: Hub-only references, targets, size limits,
and a job id that is the same exactly when the merge would be the same."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from merge_engine.errors import RecipeError
from merge_engine.plan.planner import build_plan
from merge_engine.recipe.schema import ModelReference, parse_recipe, recipe_from_text
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.tensors import TensorInfo
from service.intake.request import (
    MergeRequest,
    check_hub_only,
    check_limits,
    check_model_count,
    check_target,
    job_id,
)
from service.settings import Limits

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


@pytest.mark.parametrize(
    "target",
    ["alice", "alice/", "../alice/x", "alice/x/y", "alice/modèle", "alice/x.", "alice/a--b",
     "alice/x.git", "alice/x\n", "alice/" + "m" * 97],
)  # fmt: skip
def test_targets_the_hub_would_refuse_are_refused_before_anything_runs(target):
    with pytest.raises(RecipeError, match="is not a name the Hub accepts") as error:
        check_target(target)
    assert error.value.field == "target"


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        ("alice/a--b", "model 'alice/a--b' is not a name the Hub accepts"),
        ("alice/modèle", "is not a name the Hub accepts"),
        ("org/name@..", "revision '..' is not a branch, tag or commit name"),
        ("org/name@../x", "is not a branch, tag or commit name"),
    ],
)
def test_references_the_hub_would_refuse_get_one_sentence(reference, words):
    text = f"merge_method: linear\nmodels: [{{model: {reference!r}}}]\n"
    with pytest.raises(RecipeError, match=re.escape(words)):
        check_hub_only(recipe_from_text(text))


def test_datasets_the_hub_would_refuse_get_one_sentence():
    text = (
        "merge_method: regmean\nmodels: [{model: org/a}, {model: org/b}]\n"
        "calibration: {dataset: 'org/a--b'}\n"
    )
    with pytest.raises(RecipeError, match="dataset 'org/a--b' is not a name the Hub accepts"):
        check_hub_only(recipe_from_text(text))


def test_the_model_count_is_checked_from_the_recipe_alone():
    many = "merge_method: linear\nmodels:\n" + "".join(f"  - model: org/m{i}\n" for i in range(100))
    with pytest.raises(RecipeError, match="the recipe reads 100 models, more than the 8"):
        check_model_count(recipe_from_text(many), Limits())
    check_model_count(recipe_from_text(RECIPE), Limits(max_models=2))


def test_size_limits_are_checked_from_headers():
    with pytest.raises(RecipeError, match="more than the 0 GB limit"):
        check_limits(plan().sources, Limits(max_source_bytes=100))
    check_limits(plan().sources, Limits())


def request(target: str = "alice/merged", **options) -> MergeRequest:
    return MergeRequest(recipe_from_text(RECIPE), target, "alice", "api", **options)


def test_job_id_is_stable_for_the_same_merge_and_changes_with_what_it_produces():
    same = "models: [{parameters: {density: 0.5, weight: 1}, model: org/math}]\nbase_model: org/base\nmerge_method: ties\n"
    assert job_id(plan(), request()) == job_id(plan(same), request())
    assert job_id(plan(), request()) != job_id(plan(), request("alice/other"))
    assert job_id(plan(), request()) != job_id(plan(revisions={"org/math": "b" * 40}), request())
    # a private copy, or one that follows its sources, is another job
    assert job_id(plan(), request()) != job_id(plan(), request(private=True))
    assert job_id(plan(), request()) != job_id(plan(), request(follow_sources=True))
