"""The recipe schema reads mergekit YAML and prints it back; references parse and pin."""

from __future__ import annotations

import yaml

from merge_engine.recipe.parameters import Place, evaluate, resolve
from merge_engine.recipe.schema import ConditionalParameter, ModelReference, parse_recipe

MERGEKIT_SLERP = """
slices:
  - sources:
      - model: org/base-7b
        layer_range: [0, 32]
      - model: org/chat-7b@v1.2
        layer_range: [0, 32]
merge_method: slerp
base_model: org/base-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_a_mergekit_recipe_parses_and_prints_back():
    recipe = parse_recipe(yaml.safe_load(MERGEKIT_SLERP))
    assert recipe.slices[0].sources[1].model == ModelReference("org/chat-7b", "v1.2")
    assert recipe.input_models() == [
        ModelReference("org/base-7b"),
        ModelReference("org/chat-7b", "v1.2"),
    ]
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


def test_references_parse_revisions_and_local_folders(tmp_path):
    assert ModelReference.parse("org/name@main") == ModelReference("org/name", "main")
    assert not ModelReference.parse("org/name").is_local
    assert ModelReference.parse(str(tmp_path)).is_local
    assert ModelReference.parse("./relative/folder").is_local
    assert str(ModelReference.parse("org/name@abc123")) == "org/name@abc123"


def test_pinning_revisions_rewrites_every_reference():
    recipe = parse_recipe(yaml.safe_load(MERGEKIT_SLERP))
    pinned = recipe.with_revisions({ModelReference("org/base-7b"): "a" * 40})
    assert pinned.base_model == ModelReference("org/base-7b", "a" * 40)
    assert pinned.slices[0].sources[0].model == ModelReference("org/base-7b", "a" * 40)
    assert pinned.slices[0].sources[1].model == ModelReference("org/chat-7b", "v1.2")


def test_gradients_interpolate_and_filters_pick_the_first_match():
    t_setting = parse_recipe(yaml.safe_load(MERGEKIT_SLERP)).parameters["t"]
    assert evaluate(t_setting, Place("model.layers.0.self_attn.q_proj.weight", 0.0)) == 0.0
    assert (
        abs(evaluate(t_setting, Place("model.layers.5.self_attn.q_proj.weight", 0.375)) - 0.4)
        < 1e-12
    )  # halfway 0.5 -> 0.3
    assert evaluate(t_setting, Place("model.layers.9.mlp.up_proj.weight", 1.0)) == 0.0
    assert evaluate(t_setting, Place("model.norm.weight", 0.0)) == 0.5
    assert (
        evaluate([ConditionalParameter(filter="mlp", value=1)], Place("model.norm.weight", 0))
        is None
    )


def test_model_parameters_take_precedence_over_slice_and_global():
    scopes = [
        ("models[0].parameters", {"density": 0.2}),
        ("slices[0].parameters", {"density": 0.4}),
        ("parameters", {"density": 0.6, "weight": 1}),
    ]
    assert resolve("density", scopes, Place("x")) == (0.2, "models[0].parameters.density")
    assert resolve("weight", scopes, Place("x")) == (1, "parameters.weight")
    assert resolve("gamma", scopes, Place("x")) is None


def test_tokenizer_source_base_is_the_keyword_not_a_folder_named_base(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)  # a folder called "base" must not capture the keyword
    recipe = parse_recipe(
        {"merge_method": "linear", "models": [{"model": "org/a"}], "tokenizer_source": "base"}
    )
    assert recipe.tokenizer_source == "base"
    assert parse_recipe(
        {"merge_method": "linear", "models": [{"model": "org/a"}], "tokenizer_source": "org/tok"}
    ).tokenizer_source == ModelReference("org/tok")
