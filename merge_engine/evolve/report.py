"""What a search leaves behind: ``trials.jsonl``, the fitness plot, the layer-path picture and
the model card's "Evolutionary search" section.

Plots draw on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas, never ``pyplot``:
no global state, no window, safe from any thread.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from merge_engine.recipe import quote

STAGES = ("parameters", "layers")
"""The stages in the order they run (``space: both`` runs both)."""
SPACE_WHAT = {
    "parameters": "per-layer merge parameters (CMA-ES)",
    "layers": "a layer path over the models' layers",
    "both": "parameters, then a layer path over the sources and that merge",
}
FIGSIZE = (8, 4.5)  # inches at DPI: 800 x 450 px
DPI = 100


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated candidate, as one line of ``trials.jsonl``."""

    number: int  # optuna trial number within its stage's study
    stage: str  # "parameters" | "layers"
    params: dict[str, float]  # the trial's genome values by name
    fitness: float  # total fitness on the search split, higher is better
    scores: dict[str, float]  # per task: the metric value as people read it
    seconds: float  # wall time of the trial (merge + evaluation)
    merge_seconds: float  # the part spent building the candidate
    worker: str  # which process evaluated it, e.g. "host:pid"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"trial stage {self.stage!r} is not one of {', '.join(STAGES)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> TrialRecord:
        return cls(**json.loads(line))


@dataclass(frozen=True)
class Baseline:
    """A model the winner is compared with: a source, or a merge with default parameters."""

    label: str  # e.g. "source org/a", "uniform ties merge"
    search: float  # total fitness on the search split
    held_out: float  # total fitness on the held-out split
    scores: dict[str, float]  # per task metric on the held-out split


@dataclass(frozen=True)
class PathSlot:
    """One layer of a layer path."""

    model: str  # label of the model the layer comes from
    layer: int  # layer index in that model
    scale: float  # the path's scale on this layer's input (1.0 when scaling is off); the
    # written model holds it folded into the weights (docs/evolve.md)


def in_run_order(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Records by stage (parameters, then layers), then trial number."""
    return sorted(records, key=lambda r: (STAGES.index(r.stage), r.number))


def write_trials(path: Path, records: list[TrialRecord]) -> None:
    """Write ``records`` as JSON lines in run order; readers never see a half-written file."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.writelines(record.to_json() + "\n" for record in in_run_order(records))
        os.chmod(temp, 0o644)  # as readable as every other output file, not mkstemp's 0600
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def append_trials(path: Path, records: list[TrialRecord]) -> None:
    """Add ``records`` at the end of ``path`` in one write: after each trial a search adds its
    new lines instead of writing thousands of trials of thousands of genes again (a reader may
    see the last line while it is being written)."""
    data = "".join(record.to_json() + "\n" for record in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_trials(path: Path) -> list[TrialRecord]:
    """The records of a ``trials.jsonl``, in run order; a bad line names the file and line."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(TrialRecord.from_json(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number} is not a trial record: {exc}") from None
    return in_run_order(records)


def _save(figure: Figure, out: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(out, format="png", dpi=DPI)
    return Path(out)


def fitness_figure(records: list[TrialRecord], baselines: list[Baseline]) -> Figure:
    """Fitness per trial in run order, the best so far, and each baseline's search fitness."""
    records = in_run_order(records)
    fitness = np.array([r.fitness for r in records], dtype=float)
    trials = np.arange(len(records))
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    ax.scatter(trials, fitness, s=14, color="C0", label="trial", zorder=3)
    ax.step(trials, np.fmax.accumulate(fitness), where="post", color="C1", label="best so far")
    for i, baseline in enumerate(baselines):
        ax.axhline(
            baseline.search,
            linestyle="--",
            linewidth=1,
            color=f"C{(i + 2) % 10}",
            label=baseline.label,
        )
    stages = [s for s in STAGES if any(r.stage == s for r in records)]
    if len(stages) == 2:
        boundary = sum(r.stage == STAGES[0] for r in records) - 0.5
        ax.axvline(boundary, color="grey", linewidth=1)
        top = ax.get_xaxis_transform()  # x in data, y in axes
        ax.text(boundary, 0.98, f"{STAGES[0]} ", ha="right", va="top", transform=top)
        ax.text(boundary, 0.98, f" {STAGES[1]}", ha="left", va="top", transform=top)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order run)")
    ax.set_ylabel("fitness (search split, higher is better)")
    ax.set_title("fitness per trial")
    ax.legend(loc="best", fontsize="small")
    return figure


def plot_fitness(records: list[TrialRecord], baselines: list[Baseline], out: Path) -> Path:
    """Save :func:`fitness_figure` as an 800 x 450 PNG at ``out``."""
    return _save(fitness_figure(records, baselines), out)


def path_figure(slots: list[PathSlot], models: list[str], layers_per_model: list[int]) -> Figure:
    """A layer path: slot on x, one band of rows per model (its layers) on y."""
    if len(models) != len(layers_per_model):
        raise ValueError(f"{len(models)} models but {len(layers_per_model)} layer counts")
    offsets = dict(zip(models, np.cumsum([0, *layers_per_model])[:-1].tolist(), strict=True))
    for i, slot in enumerate(slots):
        if slot.model not in offsets:
            raise ValueError(f"path slot {i} names model {slot.model!r}, not one of {models}")
        if not 0 <= slot.layer < layers_per_model[models.index(slot.model)]:
            raise ValueError(f"path slot {i}: {slot.model} has no layer {slot.layer}")
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    for i, (model, count) in enumerate(zip(models, layers_per_model, strict=True)):
        ax.axhspan(
            offsets[model] - 0.5, offsets[model] + count - 0.5, color=f"C{i % 10}", alpha=0.08
        )
    x = np.arange(len(slots))
    y = np.array([offsets[s.model] + s.layer for s in slots])
    ax.plot(x, y, color="grey", linewidth=0.8, zorder=1)
    for i, model in enumerate(models):
        mine = [j for j, s in enumerate(slots) if s.model == model]
        ax.scatter(x[mine], y[mine], s=24, color=f"C{i % 10}", zorder=2)
    if any(s.scale != 1 for s in slots):
        for j, slot in enumerate(slots):
            ax.annotate(
                f"{slot.scale:.3g}",
                (x[j], y[j]),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=7,
            )
    ax.set_yticks([offsets[m] + (n - 1) / 2 for m, n in zip(models, layers_per_model, strict=True)])
    ax.set_yticklabels(models)
    for i, label in enumerate(ax.get_yticklabels()):
        label.set_color(f"C{i % 10}")
    ax.set_ylim(-0.5, sum(layers_per_model) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slot in the path")
    ax.set_ylabel("layer (one band per model, layer 0 at the bottom)")
    ax.set_title(f"layer path: {len(slots)} layer{'' if len(slots) == 1 else 's'}")
    return figure


def plot_path(
    slots: list[PathSlot], models: list[str], layers_per_model: list[int], out: Path
) -> Path:
    """Save :func:`path_figure` as an 800 x 450 PNG at ``out``."""
    return _save(path_figure(slots, models, layers_per_model), out)


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 12 s``, ``2 h 5 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def fitness_text(value: float | None) -> str:
    """A fitness or task score as every reader is shown it (the card, the Space's status and
    fitness table, the job log, the CLI): four significant digits, so the same value reads the
    same everywhere; one that is not a finite number (the status JSON's null) as "–"."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.4g}"


def task_column(task: str, metric: str) -> str:
    """A task's column in the fitness table: its name and metric, the name alone where the
    name is the metric (a task named after its kind)."""
    return quote.cell(task) if task == metric else f"{quote.cell(task)} ({metric})"


def wall_time_text(seconds: float) -> str:
    """A search's wall time as the card, the job log and the CLI say it: what
    ``budget.wall_time`` counts (a bot's search: the time it held a worker's search lane,
    not the time it waited for its turns)."""
    return f"{duration(seconds)} of wall time"


def _trials_done(trials_done: dict[str, int], budget: int) -> str:
    done = [(s, trials_done[s]) for s in STAGES if s in trials_done]
    if len(done) == 1:
        return f"{done[0][1]} of {budget} trials"
    return " and ".join(f"{n} of {budget} trials for the {stage}" for stage, n in done)


def _row(cells: list[str], bold: bool = False) -> str:
    return "| " + " | ".join(f"**{c}**" if bold else c for c in cells) + " |"


def search_section(
    *,
    spec_yaml: str,
    space: str,
    trials_done: dict[str, int],
    budget: int,
    wall_seconds: float,
    winner_search: float,
    winner_held_out: float,
    winner_scores: dict[str, float],
    baselines: list[Baseline],
    task_metrics: dict[str, str],
    plot: str,
    path_picture: str | None,
    path: list[PathSlot] | None,
    stage_recipes: list[tuple[str, str]],
    command: str,
) -> str:
    """The card's "Evolutionary search" section: what was searched, the winner against the
    baselines, the fitness plot, the layer path, the spec and recipes, the command."""

    def scores(total: float, held_out: float, by_task: dict[str, float]) -> list[str]:
        tasks = [fitness_text(by_task.get(t)) for t in task_metrics]
        return [fitness_text(total), fitness_text(held_out), *tasks]

    columns = ["model", "search fitness", "held-out fitness"]
    columns += [task_column(task, metric) for task, metric in task_metrics.items()]
    parts = [
        "## Evolutionary search",
        f"An evolutionary search explored {SPACE_WHAT[space]}: "
        f"{_trials_done(trials_done, budget)} in {wall_time_text(wall_seconds)}. "
        "Fitness is the weighted total over the tasks, higher is better; the winner is the "
        "candidate with the best search fitness, and the held-out split played no part in "
        "choosing it.",
        "\n".join(
            [
                _row(columns),
                _row(["---"] * len(columns)),
                _row(["this merge", *scores(winner_search, winner_held_out, winner_scores)], True),
                *(
                    _row([quote.cell(b.label), *scores(b.search, b.held_out, b.scores)])
                    for b in baselines
                ),
            ]
        ),
        f"![fitness per trial]({plot})",
    ]
    better = [quote.text(b.label) for b in baselines if b.search > winner_search]
    if better:  # a source is not itself a point of the space searched
        parts.insert(
            3,
            f"{' and '.join(better)} scored better on the search split than every candidate "
            "searched: the space may not contain it (widen the bounds, search more parameters) "
            "or the budget was too small.",
        )
    if path or path_picture:
        parts.append("### Layer path")
    if path:
        scaled = any(s.scale != 1 for s in path)
        parts.append(
            f"The merged model runs these {len(path)} layers in order"
            + (
                "; the search scaled each layer's input by its scale, which the weights hold "
                "folded into the layer's o_proj and down_proj (the recipe's scale parameters)."
                if scaled
                else "."
            )
        )
        rows = [_row(["slot", "model", "layer", "scale"]), _row(["---"] * 4)]
        rows += [
            _row([str(i), quote.cell(s.model), str(s.layer), f"{s.scale:.4g}"])
            for i, s in enumerate(path)
        ]
        parts.append("\n".join(rows))
    if path_picture:
        parts.append(f"![layer path]({path_picture})")
    parts += [
        "### Search spec and recipes",
        f"<details>\n<summary>Search spec</summary>\n\n{quote.code_block(spec_yaml, 'yaml')}\n\n</details>",
    ]
    for title, recipe in stage_recipes:
        parts += [f"**{title}**", quote.code_block(recipe, "yaml")]
    parts.append(f"Reproduce: {quote.code(command)}")
    return "\n\n".join(parts) + "\n"
