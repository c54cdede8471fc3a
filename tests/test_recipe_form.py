"""The Space's form as data: what it writes is a recipe the engine accepts, what it reads
back is what it wrote, and what it cannot show is named."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from merge_engine import parse_recipe
from merge_engine.errors import RecipeError
from merge_engine.methods import get_method
from merge_engine.sources.formats.blocks import block_names
from merge_engine.sources.formats.layouts import Layout
from merge_engine.sources.formats.recipe_checks import check_layout
from service.space.recipe_form import (
    DEMO_MODELS,
    FIRST_EXAMPLE,
    HUB_MODELS,
    LAYERS_HELP,
    LAYERS_LABEL,
    MergeForm,
    ModelRow,
    block_field,
    block_param,
    error_place,
    examples,
    field_line,
    from_recipe,
    layout_reference,
    method_params,
    param_help,
    parse_blocks,
    row_param_help,
    shows_layers,
    switch_method,
    to_recipe,
    to_yaml,
)


@pytest.mark.parametrize("models", [DEMO_MODELS, HUB_MODELS], ids=["demo", "hub"])
def test_every_example_is_a_valid_recipe_and_reads_back_the_same(models):
    for form in examples(models).values():
        recipe = to_recipe(form)
        parse_recipe(recipe)  # the engine's schema accepts it
        assert from_recipe(recipe) == form


def test_examples_name_the_demos_models_offline_and_real_ones_on_the_hub():
    offline, hub = examples(DEMO_MODELS), examples(HUB_MODELS)
    assert offline.keys() == hub.keys()
    named = {row.repo for form in hub.values() for row in form.models}
    assert named - set(HUB_MODELS.diffusion)
    assert all(repo.startswith("Qwen/Qwen2.5-") for repo in named - set(HUB_MODELS.diffusion))
    mbw = hub["SD1.5 weighted sum per block (MBW)"]  # A·(1−M) + B·M: the rows add up to 1
    rows = [[float(v) for v in row.blocks.split(",")] for row in mbw.models]
    assert len(rows[0]) == 26 and all(a + b == 1 for a, b in zip(*rows, strict=True))
    assert not any("demo/" in yaml.safe_dump(to_recipe(form)) for form in hub.values())
    # a name says what the example merges: "TIES: a base and 3 fine-tunes"
    ties = offline["TIES: a base and 3 fine-tunes"]
    assert ties.base_model and len(ties.models) == 3
    # the frankenmerge takes three quarters of each model's layers, ranges half-open
    assert [row.layers for row in hub["Frankenmerge (layer stacking)"].models] == ["0-18", "6-24"]


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


def test_a_rows_adapter_makes_a_base_plus_adapter_reference_and_reads_back():
    form = MergeForm(
        method="linear",
        models=[
            ModelRow("org/a", "v2", params={"weight": 0.5}, adapter="org/a-lora@c1"),
            ModelRow("org/b", params={"weight": 0.5}),
        ],
    )
    recipe = to_recipe(form)
    assert [m["model"] for m in recipe["models"]] == ["org/a@v2+org/a-lora@c1", "org/b"]
    assert parse_recipe(recipe).models[0].model.adapter.path == "org/a-lora"
    row = from_recipe(recipe).models[0]
    assert (row.repo, row.revision, row.adapter) == ("org/a", "v2", "org/a-lora@c1")
    assert from_recipe(recipe).notice == ""


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


def test_a_shared_name_shows_each_method_its_own_help_bounds_and_default():
    slerp_t = param_help(method_params("slerp", "global")["t"])
    nearswap_t = param_help(method_params("nearswap", "global")["t"])
    assert get_method("slerp").param("t").doc in slerp_t and "distance" not in slerp_t
    assert "required" in slerp_t and "[0, inf)" not in slerp_t
    assert get_method("nearswap").param("t").doc in nearswap_t and "in [0, inf)" in nearswap_t
    assert "default true" in param_help(method_params("ties", "global")["normalize"])
    assert "default false" in param_help(method_params("task_arithmetic", "global")["normalize"])
    assert "default 0.9" in param_help(method_params("regmean", "global")["alpha"])
    assert "in [0, 1]" in param_help(method_params("regmean", "global")["alpha"])


def test_a_change_of_method_keeps_what_was_set_and_takes_the_new_defaults():
    form = MergeForm(
        method="task_arithmetic",  # the new method; the form still holds the TIES values
        params={"normalize": True, "lambda": 0.8, "t": None},
        models=[ModelRow("org/a", params={"weight": 0.7, "density": 1.0})],
    )
    switched = switch_method(form, "ties")
    assert switched.params["normalize"] is False  # TIES's default: task arithmetic's instead
    assert switched.params["lambda"] == 0.8  # set by the person: kept
    assert switched.models[0].params == {"weight": 0.7, "density": 1.0}
    to_slerp = switch_method(MergeForm("slerp", {"t": None, "normalize": True}), "ties")
    assert to_slerp.params["t"] is None  # required, no default to show


def test_values_a_method_lacks_come_back_when_a_method_that_has_them_is_chosen():
    """ties → slerp → dare_ties: slerp has neither per-model weights nor TIES's globals."""
    ties = examples(DEMO_MODELS)[FIRST_EXAMPLE]
    ties.params = {"int8_mask": True, "lambda": 0.8, "normalize": True}  # normalize untouched
    weights = [(row.params["weight"], row.params["density"]) for row in ties.models]
    slerp = switch_method(replace(ties, method="slerp"), "ties")
    assert slerp.set_aside == {"int8_mask": True, "lambda": 0.8}  # the default is not kept
    assert slerp.models[0].set_aside == {"weight": 1.0, "density": 0.5}
    assert "weight" not in to_yaml(slerp) and "lambda" not in to_yaml(slerp)
    slerp.params["t"] = 0.5
    slerp.params["int8_mask"] = None  # a hidden field's value is not what comes back
    dare = switch_method(replace(slerp, method="dare_ties"), "slerp")
    assert [(row.params["weight"], row.params["density"]) for row in dare.models] == weights
    assert dare.params["int8_mask"] is True and dare.params["lambda"] == 0.8
    assert dare.params["normalize"] is False  # untouched under ties: dare_ties's own default
    assert dare.set_aside == {"t": 0.5} and not any(row.set_aside for row in dare.models)
    recipe = to_recipe(dare)
    assert recipe["parameters"] == {"lambda": 0.8, "int8_mask": True}
    assert recipe["models"][1]["parameters"] == {"weight": 0.7, "density": 0.5}
    # what was changed since is what counts, not what was set aside before it
    dare.models[0].params["density"] = 0.3
    again = switch_method(replace(dare, method="slerp"), "dare_ties")
    assert again.params["t"] == 0.5  # slerp's t came back too
    back = switch_method(replace(again, method="ties"), "slerp")
    assert back.models[0].params["density"] == 0.3 and back.set_aside == {"t": 0.5}


def test_the_weight_a_block_row_replaces_is_not_said_to_be_required():
    form = sd_form()
    weight = method_params("linear", "per_model")["weight"]
    for row in form.models:  # with values in the block row or without
        shown = row_param_help(form, row, weight)
        assert "required unless the 'weight per block' row below is filled" in shown
        assert shown.startswith(weight.doc)
    language = replace(form, family="transformers")
    assert row_param_help(language, language.models[1], weight).endswith("; required")
    scale = method_params("passthrough", "per_model")["scale"]  # optional anyway
    assert row_param_help(sd_form(method="passthrough"), form.models[1], scale) == param_help(scale)


def test_the_layer_field_says_its_range_is_half_open():
    assert "[start-end)" in LAYERS_LABEL
    assert "half-open" in LAYERS_HELP and "0-3 takes layers 0, 1 and 2" in LAYERS_HELP
    form = MergeForm(method="passthrough", models=[ModelRow("org/a", layers="0-3")])
    assert to_recipe(form)["slices"][0]["sources"][0]["layer_range"] == [0, 3]


def test_an_error_field_is_found_on_its_line_of_the_yaml():
    text = """merge_method: ties
models:
  - model: org/a
    parameters:
      density: 1.5
  - model: org/b
    parameters: {density: 0.5}
parameters:
  lambda: 3
"""
    assert field_line(text, "models[0].parameters.density") == 5
    assert field_line(text, "models[1].parameters.density") == 7
    assert field_line(text, "parameters.lambda") == 9
    assert field_line(text, "merge_method") == 1
    assert field_line(text, "models[7]") == 2  # the deepest part the text has
    assert field_line(text, "dtype") is None
    assert field_line("models: [a", "models") is None


@pytest.mark.parametrize(
    ("field", "message", "place"),
    [
        ("models[1].parameters.density", "", "model-1"),
        ("slices[0].sources[0].layer_range", "", "model-0"),
        ("models[9]", "", "models"),
        ("models", "", "models"),
        ("tokenizer_source", "", "models"),
        ("parameters.t", "", "parameters"),
        ("merge_method", "", "method"),
        ("base_model", "", "base_model"),
        ("target", "", "target"),
        ("out_dtype", "", "dtype"),
        ("calibration.examples", "", "recipe"),
        (None, "model org/b has no tensor x", "model-1"),
        (None, "model org/bb has no tensor x", "recipe"),
        (None, "something else", "recipe"),
    ],
)
def test_errors_go_next_to_the_field_they_name(field, message, place):
    assert error_place(field, message, ["org/a", "org/b"]) == place


SD_ROW = "1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,0.25"
"""26 values: SD1.5's BASE, IN00…IN11, M00, OUT00…OUT11, as typed."""


def sd_form(**changes) -> MergeForm:
    """Two SD1.5 models merged linearly, the first with a row of block weights."""
    form = MergeForm(
        method="linear",
        models=[
            ModelRow("demo/sd-a", blocks=SD_ROW),
            ModelRow("demo/sd-b", params={"weight": 1.0}),
        ],
        family="sd1",
    )
    for name, value in changes.items():
        setattr(form, name, value)
    return form


def test_a_block_row_goes_to_the_recipe_and_yaml_and_back_to_the_form():
    form = sd_form()
    recipe = to_recipe(form)
    blocks = recipe["models"][0]["parameters"]["weight"]["blocks"]
    assert blocks == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, *[1] * 11, 0.25]
    assert recipe["models"][1] == {"model": "demo/sd-b", "parameters": {"weight": 1.0}}
    parsed = parse_recipe(recipe)  # the engine's schema takes it as block values
    assert parsed.models[0].parameters["weight"].blocks[13] == 0.5
    text = to_yaml(form)
    assert "blocks: [1, 0, 0" in text and "0.25]" in text
    back = from_recipe(yaml.safe_load(text))
    assert back.models[0].blocks == SD_ROW and not back.notice
    assert back == sd_form(family="")  # the family is the Space's finding, not the recipe's
    # a row typed with spaces, or given in the recipe as one string, reads the same
    assert parse_blocks(" 1, 0.5  0 ") == [1, 0.5, 0]
    string = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": {"blocks": "1, 0.5,0"}}}],
    }
    assert from_recipe(string).models[0].blocks == "1,0.5,0"


def test_the_block_row_shows_for_diffusion_models_headed_by_their_block_names():
    form = sd_form()
    field = block_field(form, form.models[1])  # an empty row shows too: it can be typed in
    assert field.visible and field.label == "weight per block"
    assert " ".join(block_names("sd1")) in field.info and field.info.startswith("26 values")
    assert "BASE IN00 IN01" in field.info and "M00 OUT00" in field.info
    sdxl = block_field(sd_form(family="sdxl"), form.models[0])
    assert sdxl.info.startswith("20 values") and "IN08 M00 OUT00" in sdxl.info
    assert "IN09" not in sdxl.info
    assert not shows_layers(form, form.models[0])  # diffusion models are merged whole
    # passthrough's block parameter is its scale; slerp has none per model: no row
    assert block_param("passthrough") == "scale" and block_param("ties") == "weight"
    assert not block_field(sd_form(method="slerp"), form.models[1]).visible


def test_the_block_row_stays_hidden_for_a_transformers_form():
    for form in examples(DEMO_MODELS).values():
        if any(row.blocks for row in form.models):
            continue  # a row with values stays visible, so a refusal points at something
        form.family = "transformers"
        assert not any(block_field(form, row).visible for row in form.models)
        assert all(shows_layers(form, row) for row in form.models)
        assert "blocks" not in to_yaml(form)
        form.family = ""  # not inspected yet: hidden as well
        assert not any(block_field(form, row).visible for row in form.models)


def test_a_wrong_number_of_block_values_is_the_engines_sentence_by_that_models_row():
    form = sd_form()
    form.models[1].blocks = ",".join(["1"] * 25)
    recipe = parse_recipe(to_recipe(form))
    with pytest.raises(RecipeError) as refused:
        check_layout(recipe, Layout("sd1", "diffusers"), needs_data=False, method="linear")
    error = refused.value
    assert "has 25 block values" in str(error) and "BASE, IN00" in str(error)
    assert error_place(error.field, str(error), ["demo/sd-a", "demo/sd-b"]) == "model-1"
    # what is not a number goes to the engine as typed, which refuses it by that row
    form.models[1].blocks = "1,x,0"
    assert to_recipe(form)["models"][1]["parameters"]["weight"] == {"blocks": "1,x,0"}
    with pytest.raises(RecipeError) as refused:
        parse_recipe(to_recipe(form))
    assert error_place(refused.value.field, str(refused.value), []) == "model-1"


def test_block_values_the_form_cannot_show_stay_in_the_yaml_and_are_named():
    data = {
        "merge_method": "ties",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": {"blocks": [0.5]}}}],
    }
    form = from_recipe(data)
    assert form.models[0].blocks == "" and "models[0].parameters.density" in form.notice


def test_the_family_is_found_from_the_first_model_else_the_base():
    assert layout_reference("demo/sd-a", "v2", "demo/base") == "demo/sd-a@v2"
    assert layout_reference(" ", "v2", "demo/base") == "demo/base"
    assert layout_reference("", "", "") is None
