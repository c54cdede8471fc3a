"""A search's report: trials.jsonl round-trips in run order, the plots are real PNGs that show
what they claim, and the card section puts the winner first and quotes spec, recipes, command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from merge_engine.evolve.report import (
    Baseline,
    PathSlot,
    TrialRecord,
    duration,
    fitness_figure,
    fitness_text,
    path_figure,
    plot_fitness,
    plot_path,
    read_trials,
    search_section,
    write_trials,
)


def trial(number: int, stage: str = "parameters", fitness: float = 0.5) -> TrialRecord:
    return TrialRecord(
        number=number,
        stage=stage,
        params={"weight.0": 0.25 * number, "density.0": 0.5},
        fitness=fitness,
        scores={"copy": fitness, "pick": 1 - fitness},
        seconds=1.5,
        merge_seconds=0.5,
        worker="host:123",
    )


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (800, 450)
        return np.asarray(image.convert("RGB"), dtype=int)


def test_trials_round_trip_in_run_order(tmp_path):
    records = [trial(1, "layers"), trial(2), trial(0, "layers", 0.9), trial(0), trial(10)]
    path = tmp_path / "trials.jsonl"
    write_trials(path, records)
    expected = [trial(0), trial(2), trial(10), trial(0, "layers", 0.9), trial(1, "layers")]
    assert read_trials(path) == expected
    lines = path.read_text().splitlines()
    assert [json.loads(line)["number"] for line in lines] == [0, 2, 10, 0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.jsonl"]  # no temp file left
    write_trials(path, records[:1])  # replaced, not appended
    assert read_trials(path) == [trial(1, "layers")]


def test_bad_trial_line_names_file_and_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    path.write_text(trial(0).to_json() + "\n" + '{"number": 1}\n')
    with pytest.raises(ValueError, match=r"trials\.jsonl:2 is not a trial record"):
        read_trials(path)
    with pytest.raises(ValueError, match="'weights' is not one of parameters, layers"):
        trial(0, "weights")


def test_fitness_plot_shows_trials_best_so_far_and_baselines(tmp_path):
    records = [trial(i, fitness=f) for i, f in enumerate([0.2, 0.5, 0.3, 0.7])]
    baseline = Baseline("source org/a", search=0.4, held_out=0.35, scores={"copy": 0.4})
    with_line = pixels(plot_fitness(records, [baseline], tmp_path / "with.png"))
    without = pixels(plot_fitness(records, [], tmp_path / "without.png"))
    assert (with_line != without).any(axis=2).sum() > 500

    ax = fitness_figure(records, [baseline]).axes[0]
    assert ax.get_title() == "fitness per trial"
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "trial",
        "best so far",
        "source org/a",
    ]
    best = next(line for line in ax.lines if line.get_label() == "best so far")
    assert list(best.get_ydata()) == [0.2, 0.5, 0.5, 0.7]


def test_fitness_plot_divides_two_stages(tmp_path):
    records = [trial(0), trial(1), trial(0, "layers", 0.8)]
    ax = fitness_figure(records, []).axes[0]
    dividers = [line for line in ax.lines if list(line.get_xdata()) == [1.5, 1.5]]
    assert len(dividers) == 1
    assert {"parameters ", " layers"} <= {t.get_text() for t in ax.texts}
    one_stage = fitness_figure(records[:2], []).axes[0]
    assert not one_stage.texts


def test_plots_need_no_pyplot(tmp_path):
    script = (
        "import sys; from pathlib import Path\n"
        "from merge_engine.evolve.report import *\n"
        f"plot_fitness([], [], Path({str(tmp_path / 'f.png')!r}))\n"
        f"plot_path([PathSlot('a', 0, 1.0)], ['a'], [1], Path({str(tmp_path / 'p.png')!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    pixels(tmp_path / "f.png")


def test_path_picture(tmp_path):
    models = ["org/a", "org/b"]
    slots = [PathSlot("org/a", 0, 1.0), PathSlot("org/b", 1, 1.0), PathSlot("org/a", 2, 1.0)]
    plain = pixels(plot_path(slots, models, [3, 2], tmp_path / "plain.png"))
    ax = path_figure(slots, models, [3, 2]).axes[0]
    assert ax.get_title() == "layer path: 3 layers"
    assert [t.get_text() for t in ax.get_yticklabels()] == models
    line = ax.lines[0]
    assert list(line.get_xdata()) == [0, 1, 2]
    assert list(line.get_ydata()) == [0, 4, 2]  # org/b's band starts after org/a's 3 layers
    assert not ax.texts  # no scale written when every scale is 1

    scaled = [PathSlot("org/a", 0, 1.0), PathSlot("org/b", 1, 0.75), PathSlot("org/a", 2, 1.2)]
    ax = path_figure(scaled, models, [3, 2]).axes[0]
    assert [t.get_text() for t in ax.texts] == ["1", "0.75", "1.2"]
    assert (pixels(plot_path(scaled, models, [3, 2], tmp_path / "s.png")) != plain).any()


@pytest.mark.parametrize(
    ("slot", "message"),
    [(PathSlot("org/c", 0, 1.0), "names model 'org/c'"), (PathSlot("org/b", 2, 1.0), "no layer 2")],
)
def test_path_picture_rejects_unknown_layers(slot, message):
    with pytest.raises(ValueError, match=message):
        path_figure([slot], ["org/a", "org/b"], [3, 2])


def section(**overrides) -> str:
    arguments = dict(
        spec_yaml="space: layers\nbudget: {trials: 48}\n",
        space="layers",
        trials_done={"layers": 48},
        budget=48,
        wall_seconds=192.4,
        winner_search=0.8123456,
        winner_held_out=0.75,
        winner_scores={"copy": 0.75, "pick": 0.5},
        baselines=[
            Baseline("source org/a", 0.5, 0.45, {"copy": 0.4, "pick": 0.5}),
            Baseline("a | b ties", 0.6, 0.55, {"copy": 0.6}),
        ],
        task_metrics={"copy": "exact_match", "pick": "multiple_choice"},
        plot="search/fitness.png",
        path_picture="search/path.png",
        path=[PathSlot("org/a", 0, 1.0), PathSlot("org/b", 3, 0.875)],
        stage_recipes=[("Layer path recipe", "merge_method: passthrough\n")],
        command="mergebot evolve search.yaml ./out",
    )
    return search_section(**(arguments | overrides))


def test_search_section():
    text = section()
    lines = text.splitlines()
    assert lines[0] == "## Evolutionary search"
    assert (
        "a layer path over the models' layers: 48 of 48 trials in 3 min 12 s of wall time." in text
    )
    header = lines.index(
        "| model | search fitness | held-out fitness | copy (exact_match) | pick (multiple_choice) |"
    )
    assert lines[header + 2] == "| **this merge** | **0.8123** | **0.75** | **0.75** | **0.5** |"
    assert lines[header + 3] == "| source org/a | 0.5 | 0.45 | 0.4 | 0.5 |"
    assert lines[header + 4] == "| a \\| b ties | 0.6 | 0.55 | 0.6 | – |"
    assert "![fitness per trial](search/fitness.png)" in lines
    assert "![layer path](search/path.png)" in lines
    assert "| 1 | org/b | 3 | 0.875 |" in lines
    assert (
        "<summary>Search spec</summary>\n\n```yaml\nspace: layers\nbudget: {trials: 48}\n```"
        in text
    )
    assert "**Layer path recipe**\n\n```yaml\nmerge_method: passthrough\n```" in text
    assert lines[-1] == "Reproduce: `mergebot evolve search.yaml ./out`"


def test_a_task_named_after_its_metric_heads_its_column_once():
    text = section(task_metrics={"nll": "nll", "sums": "exact_match"})
    assert "| model | search fitness | held-out fitness | nll | sums (exact_match) |" in text
    assert "(nll)" not in text


def test_fitness_text_is_four_significant_digits_and_a_dash_for_no_number():
    values = (0.8123456, -4.54321, 12345.678, 0.5, None, float("nan"), float("inf"))
    assert [fitness_text(v) for v in values] == [
        "0.8123",
        "-4.543",
        "1.235e+04",
        "0.5",
        "–",
        "–",
        "–",
    ]


def test_search_section_says_when_a_source_beats_every_candidate():
    assert "scored better" not in section()
    text = section(winner_search=0.55)
    assert "a \\| b ties scored better on the search split than every candidate searched" in text
    assert text.index("scored better") > text.index("| **this merge**")


def test_search_section_both_stages_without_path():
    text = section(
        space="both",
        trials_done={"layers": 30, "parameters": 48},
        wall_seconds=7300,
        path=None,
        path_picture=None,
        stage_recipes=[("Parameters", "a: 1"), ("Layers", "text: '```'")],
        command="echo `date`",
    )
    assert "parameters, then a layer path over the sources and that merge" in text
    assert (
        "48 of 48 trials for the parameters and 30 of 48 trials for the layers in 2 h 1 min of "
        "wall time." in text
    )
    assert "Layer path" not in text and "![layer path]" not in text
    assert "````yaml\ntext: '```'\n````" in text  # a fence longer than any backticks inside
    assert text.endswith("Reproduce: `` echo `date` ``\n")


def test_duration():
    assert [duration(s) for s in (4.31, 59.96, 192.4, 7300)] == [
        "4.3 s",
        "1 min 0 s",
        "3 min 12 s",
        "2 h 1 min",
    ]
