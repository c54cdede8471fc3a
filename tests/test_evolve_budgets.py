"""A search's size is bounded by its spec: every number that sizes memory or work has a range,
every float is finite, the genome has a cap counted before any weight is read, a non-finite
fitness fails the search at once, and a stop abandons the running trial within seconds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import optuna
import pytest
from conftest import SEARCH_TEXTS
from optuna.trial import TrialState

from merge_engine import cli
from merge_engine.errors import MergeError, RecipeError
from merge_engine.evolve.checks import check_spec
from merge_engine.evolve.search import evolve
from merge_engine.evolve.spec import spec_from_text
from merge_engine.evolve.study import NonFiniteFitness, open_storage
from merge_engine.recipe.limits import RecipeLimits


def spec_text(
    models: str = "[{model: org/a}, {model: org/b}]",
    task: str = "",
    data: str = "examples: [one text, another text]",
    budget: str = "",
    extra: str = "",
    space: str = "parameters",
) -> str:
    return f"""space: {space}
models: {models}
fitness: [{{kind: nll, {task} data: {{{data}}}}}]
budget: {{trials: 4{budget}}}
{extra}"""


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        (spec_text(budget=", population: 1000000000"), "budget.population: must be at most 1000"),
        (
            spec_text(budget=", population: 9223372036854775808"),
            "budget.population: must be at most",
        ),
        (spec_text(extra="seed: 4294967296"), "seed: must be less than 4294967296"),
        (spec_text(extra="seed: -1"), "seed: must be at least 0, got -1"),
        (
            spec_text(data="examples: [a, b], seed: 4294967296"),
            "fitness[0].data.seed: must be less",
        ),
        (spec_text(task="weight: .inf,"), "fitness[0].weight: must be a finite number, got inf"),
        (spec_text(task="weight: 1e300,"), "fitness[0].weight: must be at most 1000000"),
        (
            spec_text(task="held_out_fraction: .nan,"),
            "fitness[0].held_out_fraction: must be a finite",
        ),
        (spec_text(task="batch_size: 100000,"), "fitness[0].batch_size: must be at most 256"),
        (spec_text(task="max_length: 10000000,"), "fitness[0].max_length: must be at most 8192"),
        (
            spec_text(data="examples: [a, b], samples: 10000000"),
            "fitness[0].data.samples: must be at most",
        ),
        (
            spec_text(budget=", wall_time: .nan"),
            "budget.wall_time: must be a finite number, got nan",
        ),
        (
            spec_text(extra="parameters: {search: {weight: [0, .nan]}}"),
            "parameters.search.weight[1]: must be a finite number, got nan",
        ),
        (
            spec_text(space="layers", extra="layers: {scale_bounds: [1, .inf]}"),
            "layers.scale_bounds[1]: must be a finite number, got inf",
        ),
        (
            spec_text(space="layers", extra="layers: {scale_bounds: [1, 1e30]}"),
            "layers.scale_bounds: scales must lie in [0.01, 100], got [1, 1e+30]",
        ),
        (
            spec_text(extra="parameters: {filters: [mlp, self_attn, mlp]}"),
            "parameters.filters: filter 'mlp' is listed twice; list each filter once",
        ),
    ],
)
def test_numbers_out_of_range_are_refused_when_the_spec_is_read(text: str, sentence: str):
    with pytest.raises(RecipeError) as refused:
        spec_from_text(text)
    assert str(refused.value).startswith(sentence), str(refused.value)
    assert "\n" not in str(refused.value)


def test_inline_examples_of_a_search_keep_the_recipe_limit_per_example():
    long = "x" * 8193
    with pytest.raises(RecipeError) as refused:
        spec_from_text(spec_text(data=f"examples: [short, {long}]"))
    assert str(refused.value) == (
        "fitness[0].data.examples[1]: is 8,193 characters long, more than the 8,192 allowed "
        "for one example; shorten it"
    )
    limits = RecipeLimits(max_example_chars=100)
    with pytest.raises(RecipeError, match=r"held_out.examples\[0\]: is 101 characters"):
        spec_from_text(spec_text(task=f"held_out: {{examples: [{'y' * 101}]}},"), limits)


def test_the_genome_is_capped_before_any_weight_or_task_data_is_read(scored_family, tmp_path):
    base, tuned = scored_family
    models = f"[{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]"
    missing = f"path: {tmp_path / 'never-read.jsonl'}"  # read only after the genes are counted
    filters = ", ".join(f"f{i}" for i in range(300))
    spec = spec_from_text(
        spec_text(
            models=models,
            data=missing,
            extra=f"base_model: {base}\nparameters: {{filters: [{filters}]}}",
        )
    )
    with pytest.raises(RecipeError) as refused:
        check_spec(spec, max_genes=512)
    assert str(refused.value) == (
        "parameters.filters: the parameter search has 4,816 genes (2 parameters x 2 models x "
        "301 filter groups x 4 layer groups), more than the 512 allowed; use fewer filters, "
        "a larger layers_per_value or fewer parameters in search"
    )
    path = spec_from_text(
        spec_text(
            models=models,
            data=missing,
            space="both",
            extra=f"base_model: {base}\nlayers: {{repeats: 8}}",
        )
    )
    with pytest.raises(RecipeError) as refused:
        check_spec(path, max_genes=100)
    # space: both adds the parameter stage's winner (4 layers) to the two sources' 8
    assert str(refused.value).startswith(
        "layers.scaling: the layer path has 240 genes (96 slots + 144 scales), more than the 100 allowed"
    )


def test_a_non_finite_fitness_fails_the_search_at_once_saying_why(
    scored_family, tmp_path, one_thread
):
    base, tuned = scored_family
    models = f"[{{model: {tuned[0]}}}, {{model: {tuned[1]}}}]"
    examples = json.dumps(SEARCH_TEXTS * 4)
    # float16 weights overflow for weights far from 1: the candidate's logits are not finite
    genome = (
        "parameters: {method: task_arithmetic, search: {weight: [-100000, 100000]}, dtype: float16}"
    )
    spec = spec_from_text(
        spec_text(
            models=models,
            data=f"examples: {examples}",
            budget="0, population: 4",
            extra=f"base_model: {base}\n{genome}",
        )
    )
    with pytest.raises(NonFiniteFitness) as failed:
        evolve(spec, tmp_path / "out", device="cpu", show_progress=False)
    message = str(failed.value)
    assert " of the parameters search has fitness nan (task nll scored nan)" in message
    assert "narrow the searched bounds (parameters.search" in message
    number = int(re.match(r"trial (\d+) of", message)[1])
    done = (tmp_path / "out" / "evolve" / "trials.jsonl").read_text().splitlines()
    assert len(done) == number < 40, "the search stopped at the first non-finite fitness"


def slow_rows(path: Path, count: int = 1200) -> Path:
    """Texts of 1,024 characters (tokens, for the tiny tokenizer), scored one per batch:
    about a minute a split on a shared CPU, and every batch a point where a stop is seen."""
    text = (" ".join(SEARCH_TEXTS) + " ") * 64
    path.write_text("".join(json.dumps({"text": text[:1024]}) + "\n" for _ in range(count)))
    return path


def test_a_stop_abandons_the_running_trial_within_seconds(scored_family, tmp_path, one_thread):
    base, tuned = scored_family
    rows = slow_rows(tmp_path / "rows.jsonl")
    held_out = json.dumps(SEARCH_TEXTS)
    spec = spec_from_text(
        spec_text(
            models=f"[{{model: {tuned[0]}}}]",
            task="max_length: 1024, batch_size: 1,",
            data=f"path: {rows}}}, held_out: {{examples: {held_out}",
            extra=f"base_model: {base}",
        )
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    store = open_storage(storage)
    name = "stopped"
    asked: list[float] = []

    def stop() -> bool:
        """Once trial 0 runs (after the source was scored, which takes as long as a trial's
        scoring), ask to stop."""
        try:
            study = optuna.load_study(study_name=f"{name}-parameters", storage=store)
        except KeyError:
            return False
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    started = time.monotonic()
    with pytest.raises(MergeError, match="finished no trial before it stopped"):
        evolve(
            spec,
            tmp_path / "out",
            storage=storage,
            study_name=name,
            device="cpu",
            show_progress=False,
            stop=stop,
        )
    stopped = time.monotonic()
    trial_seconds = asked[0] - started  # loading, then one source scored: about one trial
    assert stopped - asked[0] < min(10.0, trial_seconds / 3), (stopped - asked[0], trial_seconds)
    study = optuna.load_study(study_name=f"{name}-parameters", storage=store)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL]


def test_the_cli_stops_at_wall_time_within_seconds_whatever_it_is_doing(
    scored_family, tmp_path, capsys
):
    """Scoring the source before the first trial takes minutes; a wall time of 3 s stops it
    there, and ``mergebot evolve`` says why in one sentence."""
    base, tuned = scored_family
    rows = slow_rows(tmp_path / "rows.jsonl", count=4000)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        spec_text(
            models=f"[{{model: {tuned[0]}}}]",
            task="max_length: 1024, batch_size: 1,",
            data=f"path: {rows}",
            budget=", wall_time: 3s",
            extra=f"base_model: {base}",
        )
    )
    capsys.readouterr()
    started = time.monotonic()
    assert cli.main(["evolve", str(spec), str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 1
    assert time.monotonic() - started < 30
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' bars
    assert message == (
        "error: the search stopped (its wall time ran out, or it was asked to stop) before it "
        "finished a trial; there is nothing to publish: give it more budget.wall_time"
    )
    assert not (tmp_path / "out").exists()


def test_a_search_status_holds_null_where_a_number_is_not_finite():
    from service.workflows.search_steps import finite_json

    status = {
        "best": {"fitness": float("nan")},
        "trials": [{"fitness": -1.5, "best": float("inf")}],
    }
    assert json.dumps(finite_json(status), allow_nan=False) == (
        '{"best": {"fitness": null}, "trials": [{"fitness": -1.5, "best": null}]}'
    )
