"""The model card documents method, parameters, pinned revisions and recipe; metadata lists Hub ids only."""

from __future__ import annotations

import importlib.metadata
import json

import huggingface_hub
import torch
import yaml
from conftest import write_recipe

from merge_engine import load_recipe, preflight
from merge_engine.cli import main
from merge_engine.output.card import build_card
from merge_engine.plan.planner import build_plan
from merge_engine.recipe.schema import ModelReference, parse_recipe
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.tensors import TensorInfo


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


def hub_plan():
    """A ties merge of Hub models: a base, two fine-tunes and a tokenizer-only donor."""
    sources = [
        source("org/base", "a" * 40, 0),
        source("org/math", "b" * 40, 1),
        source("org/code", "c" * 40, 2),
        source("org/tokenizer", "d" * 40, 3),
    ]
    return plan_for(
        """
merge_method: ties
base_model: org/base
tokenizer_source: org/tokenizer
models:
  - model: org/math
    parameters: {weight: 1.0, density: 0.5}
  - model: org/code
    parameters: {weight: 0.5, density: 0.5}
""",
        sources,
    )


def test_validate_and_the_card_count_the_merged_models_alike(llama_family, tmp_path, capsys):
    base, (a, b, c) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"""merge_method: ties
base_model: {base}
tokenizer_source: {c}
models:
  - model: {a}
    parameters: {{weight: 1, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
""",
    )
    assert main(["validate", str(recipe)]) == 0
    said = "ties of 3 models (a base and 2 fine-tunes)"  # the tokenizer donor merges nothing
    assert f"ok: {said}," in capsys.readouterr().out
    card = str(build_card(preflight(load_recipe(recipe))))
    assert "This model is a merge of 3 models (a base and 2 fine-tunes)" in card

    linear = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\n",
    )
    assert main(["validate", str(linear)]) == 0
    assert "ok: linear of 2 models," in capsys.readouterr().out
    assert "This model is a merge of 2 models," in str(build_card(preflight(load_recipe(linear))))


def test_source_links_go_to_the_hub_the_sources_came_from(monkeypatch):
    plan = hub_plan()
    text = str(build_card(plan, endpoint="http://127.0.0.1:7861/"))
    assert "| [org/base](http://127.0.0.1:7861/org/base) | base |" in text
    assert "| [org/tokenizer](http://127.0.0.1:7861/org/tokenizer) | tokenizer |" in text
    assert "huggingface.co" not in text

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.org")
    assert "[org/math](https://hub.example.org/org/math)" in str(build_card(plan))


def reproduce_section(card) -> str:
    return str(card).split("## Reproduce", 1)[1]


def test_the_card_never_says_to_pip_install_an_unpublished_name(monkeypatch):
    plan = hub_plan()
    monkeypatch.delenv("SPACE_ID", raising=False)
    off_spaces = reproduce_section(build_card(plan, command="mergebot merge r.yaml ./out"))
    assert "pip install mergebot" not in off_spaces and "pip install" not in off_spaces
    assert f"mergebot {importlib.metadata.version('mergebot')}" in off_spaces
    assert "from the source you got mergebot from" in off_spaces
    assert "```bash\nmergebot merge r.yaml ./out\n```" in off_spaces

    monkeypatch.setenv("SPACE_ID", "someone/mergebot-space")
    on_a_space = reproduce_section(build_card(plan, endpoint="https://hub.example.org"))
    assert (
        '```bash\npip install "git+https://hub.example.org/spaces/someone/mergebot-space"\n'
        "mergebot merge mergebot_recipe.yaml ./merged\n```" in on_a_space
    )
    # the offline demo on a Space talks to a local sandbox hub, which holds no Space
    demo = reproduce_section(build_card(plan, endpoint="http://127.0.0.1:7861"))
    assert 'pip install "git+https://huggingface.co/spaces/someone/mergebot-space"' in demo
    assert "pip install mergebot" not in on_a_space + demo


def test_no_card_has_more_than_one_blank_line_in_a_row(llama_family, tmp_path):
    base, (a, b, c) = llama_family
    examples = json.dumps(["one two three", "four five six", "seven eight nine"])
    recipes = {
        "ties": f"merge_method: ties\nbase_model: {base}\ntokenizer_source: {c}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1, density: 0.5}}}}]\n",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}]\n",
        "linear with a note": f"merge_method: linear\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\n",
        "slerp": f"merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.3}}\n",
        "aligned": f"merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\nalign: {{method: weight_matching}}\n",
        "fisher with data": f"merge_method: fisher\nmodels: [{{model: {a}}}, {{model: {b}}}]\ncalibration: {{examples: {examples}}}\n",
    }
    sections = set()
    for what, text in recipes.items():
        plan = preflight(load_recipe(write_recipe(tmp_path, text)))
        for card in (
            build_card(plan),
            build_card(
                plan,
                job_id="j-1",
                credit="Requested by alice.",
                changes=[f"{a}: aaaa → bbbb", f"{b}: cccc → dddd"],
            ),
        ):
            markdown = str(card)
            assert "\n\n\n" not in markdown, f"{what}:\n{markdown}"
            assert not markdown.startswith("\n") and not markdown.endswith("\n\n"), what
            sections.update(line for line in markdown.splitlines() if line.startswith("## "))
            if plan.notes:
                assert f"\n\n- {plan.notes[0]}" in markdown  # a list after a blank line
    assert {"## Alignment", "## Calibration data", "## Changes since the last merge"} <= sections
