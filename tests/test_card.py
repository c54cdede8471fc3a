"""The model card documents method, parameters, pinned revisions and recipe; metadata lists Hub ids only."""

from __future__ import annotations

import torch
import yaml

from merge_engine.card import build_card
from merge_engine.io import TensorInfo
from merge_engine.plan import build_plan
from merge_engine.recipe import ModelReference, parse_recipe
from merge_engine.sources import ModelSource


def source(ref: str, revision: str | None, seed: int) -> ModelSource:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.w": torch.randn(4, 4, generator=g) for i in range(3)}
    infos = {n: TensorInfo((4, 4), torch.float32, "m") for n in tensors}
    return ModelSource(
        ModelReference.parse(ref),
        {"num_hidden_layers": 3},
        infos,
        revision=revision,
        memory=tensors,
    )


def plan_for(text: str, sources: list[ModelSource]):
    return build_plan(parse_recipe(yaml.safe_load(text)), {s.ref: s for s in sources})


def test_card_metadata_and_body(tmp_path):
    local = tmp_path / "local-model"
    local.mkdir()
    sources = [
        source("org/base", "a" * 40, 0),
        source("org/math", "b" * 40, 1),
        source(str(local), None, 2),
    ]
    plan = plan_for(
        f"""
merge_method: ties
base_model: org/base
models:
  - model: org/math
    parameters: {{weight: 1.0, density: [0.2, 0.6]}}
  - model: {local}
    parameters: {{weight: 0.5, density: 0.5}}
""",
        sources,
    )
    card = build_card(plan, name="my-merge", command="mergebot merge mergebot_recipe.yaml ./merged")
    assert card.data.base_model == ["org/base", "org/math"]  # no local path in metadata
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert card.data.tags == ["merge", "mergebot", "ties"]
    text = str(card)
    assert "https://arxiv.org/abs/2306.01708" in text
    assert "| `density` | org/math | `0.2` to `0.6` (varies by layer or filter) | `1.0` |" in text
    assert f"| [org/base](https://huggingface.co/org/base) | base | `{'a' * 40}` |" in text
    assert f"model: org/math@{'b' * 40}" in text  # the recipe in the card is pinned
    assert "mergebot merge mergebot_recipe.yaml ./merged" in text


def test_card_of_a_local_only_merge_has_no_base_model_metadata(tmp_path):
    folders = []
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        folders.append(source(str(tmp_path / name), None, len(folders)))
    plan = plan_for(
        f"merge_method: linear\nmodels: [{{model: {folders[0].ref}}}, {{model: {folders[1].ref}}}]\nparameters: {{weight: 1}}\n",
        folders,
    )
    card = build_card(plan)
    assert (
        "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    )
    assert "(local folder)" in str(card)
