"""The Space's search form as data: what it writes is a spec the engine reads, what it reads
back is what it wrote, and what it cannot show is named and kept."""

from __future__ import annotations

import pytest
import yaml

from merge_engine.evolve.report import fitness_figure
from merge_engine.evolve.spec import spec_from_text
from service.space.recipe_form import DEMO_MODELS, HUB_MODELS
from service.space.search_form import (
    FIRST_SEARCH,
    SEARCH_METHODS,
    SearchedParam,
    SearchForm,
    TaskRow,
    examples_of,
    examples_text,
    from_spec,
    genes_yaml,
    plotted,
    progress_html,
    search_examples,
    to_spec,
    to_yaml,
)


def round_trip(form: SearchForm, previous: str = "") -> SearchForm:
    return from_spec(yaml.safe_load(to_yaml(form, previous)))


@pytest.mark.parametrize("models", [DEMO_MODELS, HUB_MODELS], ids=["demo", "hub"])
def test_every_example_is_a_valid_spec_and_reads_back_the_same(models):
    forms = search_examples(models)
    assert FIRST_SEARCH in forms
    for form in forms.values():
        spec = spec_from_text(to_yaml(form))  # the engine's schema accepts it
        assert spec.sources() and spec.fitness and spec.budget.wall_time
        assert round_trip(form) == form


def test_the_first_demo_example_searches_the_demo_models_with_inline_text():
    form = search_examples(DEMO_MODELS)[FIRST_SEARCH]
    spec = spec_from_text(to_yaml(form))
    assert [str(ref) for ref in spec.sources()] == ["demo/math", "demo/code"]
    assert str(spec.base_model) == "demo/base"
    assert spec.parameters.search == {"weight": (0, 1), "density": (0.1, 1)}
    assert spec.fitness[0].kind == "nll" and all(
        isinstance(e, str) and len(e) < 64 for e in spec.fitness[0].data.examples
    )


def test_a_full_form_writes_the_spec_it_shows():
    form = SearchForm(
        space="both",
        models=["org/a@v1", "org/b"],
        base_model="org/base",
        method="dare_ties",
        search=[SearchedParam("weight", 0.0, 1.0), SearchedParam("density", 0.2, 0.9)],
        tasks=[
            TaskRow("exact_match", "sums", 2.0, '{"prompt": "1+1=", "answer": "2"}'),
            TaskRow("nll", dataset="org/texts@main", file="train.jsonl"),
        ],
        trials=40,
        population=8,
        wall_time="30m",
    )
    assert to_spec(form) == {
        "space": "both",
        "models": [{"model": "org/a@v1"}, {"model": "org/b"}],
        "base_model": "org/base",
        "parameters": {
            "method": "dare_ties",
            "search": {"weight": [0, 1], "density": [0.2, 0.9]},
        },
        "fitness": [
            {
                "kind": "exact_match",
                "name": "sums",
                "weight": 2,
                "data": {"examples": [{"prompt": "1+1=", "answer": "2"}]},
            },
            {"kind": "nll", "data": {"dataset": "org/texts@main", "file": "train.jsonl"}},
        ],
        "budget": {"trials": 40, "population": 8, "wall_time": "30m"},
    }
    spec_from_text(to_yaml(form))
    assert round_trip(form) == form


def test_what_is_left_empty_is_left_out_and_seconds_are_a_number():
    form = SearchForm(models=["org/a"], tasks=[TaskRow("nll", examples="x")], wall_time="600")
    spec = to_spec(form)
    assert "base_model" not in spec and "search" not in spec["parameters"]
    assert spec["budget"] == {"wall_time": 600}
    assert spec["fitness"] == [{"kind": "nll", "data": {"examples": ["x"]}}]
    assert round_trip(form) == form
    # a layer path has no merge method to write
    assert "parameters" not in to_spec(SearchForm(space="layers", models=["org/a"]))


def test_a_task_with_examples_and_a_dataset_writes_both_for_the_check_to_refuse():
    form = SearchForm(models=["org/a"], tasks=[TaskRow(examples="x", dataset="org/d")], trials=4)
    with pytest.raises(Exception, match=r"fitness\[0\]\.data: give exactly one of"):
        spec_from_text(to_yaml(form))


@pytest.mark.parametrize(
    "examples",
    [
        ["plain text", "  indented", "with: a colon"],
        [{"prompt": "2+2=", "answer": "4"}, {"text": "x", "label": 1}],
        ['{"looks": "like json"}', '"quoted"', "two\nlines", " "],
    ],
    ids=["texts", "objects", "texts-that-look-like-json"],
)
def test_examples_read_back_as_written(examples):
    assert examples_of(examples_text(examples)) == examples


def test_an_example_line_that_is_not_json_is_text_and_blank_lines_are_skipped():
    assert examples_of('{not json\n\n"a"\nb') == ["{not json", "a", "b"]


def test_yaml_edits_beyond_the_form_are_kept_when_the_form_changes():
    previous = """space: parameters
models: [{model: org/a}]
parameters: {method: ties, fixed: {normalize: false}, layers_per_value: 2}
fitness:
  - kind: nll
    data: {examples: [x], samples: 2, seed: 3}
    held_out: {examples: [y]}
    max_length: 32
budget: {trials: 4}
layers: {repeats: 1}
seed: 7
"""
    form = from_spec(yaml.safe_load(previous))
    assert form.notice == (
        "shown in the YAML tab only: parameters.fixed, parameters.layers_per_value, "
        "fitness[0].held_out, fitness[0].max_length, fitness[0].data.samples, "
        "fitness[0].data.seed, layers, seed"
    )
    form.trials = 6
    form.tasks[0].examples = "x\nz"
    written = yaml.safe_load(to_yaml(form, previous))
    assert written["seed"] == 7 and written["layers"] == {"repeats": 1}
    assert written["parameters"]["fixed"] == {"normalize": False}
    assert written["parameters"]["layers_per_value"] == 2
    task = written["fitness"][0]
    assert task["held_out"] == {"examples": ["y"]} and task["max_length"] == 32
    assert task["data"] == {"examples": ["x", "z"], "samples": 2, "seed": 3}
    assert written["budget"] == {"trials": 6}
    spec_from_text(to_yaml(form, previous))


def test_a_data_path_is_kept_only_while_the_form_gives_no_other_data():
    previous = "fitness: [{kind: nll, data: {path: texts.txt}}]"
    form = SearchForm(models=["org/a"], tasks=[TaskRow()])
    assert yaml.safe_load(to_yaml(form, previous))["fitness"][0]["data"] == {"path": "texts.txt"}
    form.tasks[0].dataset = "org/texts"
    assert yaml.safe_load(to_yaml(form, previous))["fitness"][0]["data"] == {"dataset": "org/texts"}


def test_what_the_form_cannot_show_is_named():
    form = from_spec(
        {
            "space": "parameters",
            "models": ["org/a", 3],
            "parameters": {"search": {"weight": [0, 1], "density": "wide"}},
            "fitness": [{"kind": "nll"}] * 4,
            "budget": {"trials": 2, "extra": 1},
        }
    )
    assert form.models == ["org/a"] and form.search == [SearchedParam("weight", 0, 1)]
    assert len(form.tasks) == 3
    assert form.notice == (
        "shown in the YAML tab only: models[1], parameters.search.density, fitness[3], budget.extra"
    )
    assert from_spec("just text").notice == "the spec is not a YAML mapping"


def test_search_methods_are_the_ones_a_search_can_take():
    assert {"ties", "dare_ties", "task_arithmetic", "linear"} <= set(SEARCH_METHODS)
    assert not {"passthrough", "fisher", "regmean", "slerp"} & set(SEARCH_METHODS)


def test_the_running_search_shows_trials_done_best_and_the_wall_time_budget_left():
    status = {
        "done": 3,
        "budget": 30,
        "best": {"fitness": -4.54321, "stage": "parameters", "params": {"weight.m0.g0": 0.123456}},
        "seconds_left": 95.0,
    }
    shown = progress_html(status)
    assert "<span class='done'>3</span>" in shown and "<span class='budget'>30</span>" in shown
    assert "<span class='best'>-4.543</span>" in shown  # as the card writes it
    assert "wall-time budget left <span class='time-left'>1 min 35 s</span>" in shown
    assert yaml.safe_load(genes_yaml(status)) == {
        "stage": "parameters",
        "genes": {"weight.m0.g0": 0.1235},
    }
    waiting = {"done": 0, "budget": 30, "best": None, "seconds_left": None}
    assert "<span class='best'>—</span>" in progress_html(waiting) and genes_yaml(waiting) == ""


def test_the_plot_draws_the_status_trials_and_the_sources_scored_before_them():
    status = {
        "trials": [
            {"index": 0, "stage": "parameters", "number": 0, "fitness": -1.2, "worker": "w"},
            {"index": 1, "stage": "parameters", "number": 1, "fitness": -1.0, "worker": "w"},
        ],
        "baselines": [{"model": "source org/a", "search": -1.5, "held_out": -1.6}],
    }
    trials, sources = plotted(status)
    assert [(t.stage, t.number, t.fitness) for t in trials] == [
        ("parameters", 0, -1.2),
        ("parameters", 1, -1.0),
    ]
    assert [(b.label, b.search) for b in sources] == [("source org/a", -1.5)]
    fitness_figure(trials, sources)  # the card's figure draws them
