"""The Space's form as data: what it writes is a recipe the engine accepts, what it reads
back is what it wrote, and what it cannot show is named."""

from __future__ import annotations

import pytest
import yaml

from merge_engine import parse_recipe
from service.recipe_form import (
    EXAMPLES,
    MergeForm,
    ModelRow,
    error_place,
    from_recipe,
    to_recipe,
    to_yaml,
)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_every_example_is_a_valid_recipe_and_reads_back_the_same(name):
    recipe = to_recipe(EXAMPLES[name])
    parse_recipe(recipe)  # the engine's schema accepts it
    assert from_recipe(recipe) == EXAMPLES[name]


def test_defaults_stay_out_and_per_model_values_stay_with_their_model():
    form = MergeForm(
        method="ties",
        params={"normalize": True, "lambda": 0.8, "t": 0.5},  # t is not a TIES parameter
        models=[ModelRow("org/a", "v2", params={"weight": 1.0, "density": None, "t": 3})],
        base_model="org/base",
        dtype="bfloat16",
    )
    assert to_recipe(form) == {
        "merge_method": "ties",
        "base_model": "org/base",
        "parameters": {"lambda": 0.8},
        "models": [{"model": "org/a@v2", "parameters": {"weight": 1}}],
        "dtype": "bfloat16",
    }


def test_a_layer_range_makes_slices():
    form = MergeForm(
        method="passthrough",
        models=[ModelRow("org/a", layers="0-8"), ModelRow("org/b", layers="4-12")],
    )
    assert to_recipe(form)["slices"] == [
        {"sources": [{"model": "org/a", "layer_range": [0, 8]}]},
        {"sources": [{"model": "org/b", "layer_range": [4, 12]}]},
    ]
    assert "layer_range: [4, 12]" in to_yaml(form)


def test_what_the_form_cannot_show_is_named():
    form = from_recipe(
        {
            "merge_method": "slerp",
            "parameters": {"t": [0.0, 1.0]},
            "slices": [
                {
                    "sources": [
                        {"model": "org/a", "layer_range": [0, 4]},
                        {"model": "org/b", "layer_range": [0, 4]},
                    ]
                }
            ],
        }
    )
    assert "parameters.t" in form.notice and "slices[0] (several sources)" in form.notice
    assert from_recipe("just text").notice


def test_calibration_data_stays_in_the_yaml_when_the_form_changes():
    previous = """merge_method: regmean
models:
  - model: org/math
    calibration: {dataset: org/math-data, file: train.jsonl}
  - model: org/code
calibration: {examples: [def f(x), return x]}
"""
    form = from_recipe(yaml.safe_load(previous))
    assert "models[0].calibration" in form.notice and "calibration" in form.notice
    form.params["alpha"] = 0.5  # the person changes a field of the form
    form.models.append(ModelRow("org/chat"))
    recipe = parse_recipe(yaml.safe_load(to_yaml(form, previous)))
    assert recipe.models[0].calibration.dataset.path == "org/math-data"
    assert recipe.models[1].calibration is None and recipe.models[2].model.path == "org/chat"
    assert recipe.calibration.examples == ["def f(x)", "return x"]
    assert recipe.parameters == {"alpha": 0.5}


@pytest.mark.parametrize(
    ("field", "message", "place"),
    [
        ("models[1].parameters.density", "", "models"),
        ("slices[0].sources[0].layer_range", "", "models"),
        ("parameters.t", "", "parameters"),
        ("merge_method", "", "method"),
        ("base_model", "", "base_model"),
        ("target", "", "target"),
        ("out_dtype", "", "dtype"),
        (None, "model org/b has no tensor x", "models"),
        (None, "something else", "recipe"),
    ],
)
def test_errors_go_next_to_the_field_they_name(field, message, place):
    assert error_place(field, message, ["org/a", "org/b"]) == place
