"""The Space's search form as plain data, and its two-way mapping to a search spec — no Gradio
here, like :mod:`service.space.recipe_form`, so the mapping is tested directly.

The form shows what most searches set: the sources, a base model, the space, the method, up to
``MAX_SEARCHED`` searched parameters with their bounds, up to ``MAX_TASKS`` fitness tasks (kind,
name, weight, and inline examples or a Hub dataset) and the budget. The rest of a spec (the
layer genome, ``fixed`` parameters, held-out data, field names, a seed ...) stays in the YAML:
the form names it, and keeps it when the form is edited. Below the form: what Validate says of
a valid spec, and the running search's panel as HTML and YAML (trials done, best so far, the
best genes, the fitness table).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from merge_engine.evolve.report import Baseline, TrialRecord, duration, fitness_text
from merge_engine.methods import all_methods, get_method
from merge_engine.recipe import quote
from service.space.recipe_form import DEMO_MODELS, HUB_MODELS, ExampleModels, previous_document

if TYPE_CHECKING:
    from merge_engine.evolve.checks import CheckedSpec

MAX_SEARCHED = 3
MAX_TASKS = 3


def searchable(method: str) -> list[str]:
    """The per-model numbers ``method`` can search (none for an unknown method)."""
    try:
        params = get_method(method).per_model_params
    except Exception:  # noqa: BLE001  (an unknown name: Validate reports it)
        return []
    return [p.name for p in params if p.type is float]


SEARCH_METHODS = [
    m.name
    for m in all_methods()
    if not m.layer_stacking and not m.needs_data and searchable(m.name)
]
"""The methods a parameter search can use: whole-model merges without calibration data that
have a per-model number to search."""
SEARCHABLE = list(dict.fromkeys(name for method in SEARCH_METHODS for name in searchable(method)))
EXAMPLES_HELP = (
    'one example per line: plain text, or a JSON object such as {"prompt": "2+2=", "answer": "4"}'
)
FORM_KEYS = {"space", "models", "base_model", "parameters", "fitness", "budget"}
GENOME_KEYS = {"method", "search"}
TASK_KEYS = {"kind", "name", "weight", "data"}
DATA_KEYS = {"examples", "dataset", "file"}
"""What the form shows of a task's data; ``path`` and the sampling options stay in the YAML."""


@dataclass
class SearchedParam:
    name: str = ""
    low: float | None = None
    high: float | None = None


@dataclass
class TaskRow:
    kind: str = "nll"
    name: str = ""
    weight: float | None = 1.0
    examples: str = ""
    """Inline examples, as :data:`EXAMPLES_HELP` says; or else a ``dataset`` (and ``file``)."""
    dataset: str = ""
    file: str = ""


@dataclass
class SearchForm:
    space: str = "parameters"
    models: list[str] = field(default_factory=list)
    base_model: str = ""
    method: str = "ties"
    search: list[SearchedParam] = field(default_factory=list)
    """Empty: the defaults (weight, and density where the method takes it)."""
    tasks: list[TaskRow] = field(default_factory=list)
    trials: int | None = None
    population: int | None = None
    wall_time: str = ""
    """Seconds, or a duration such as 90s, 30m, 2h; empty: the bot's limit."""
    notice: str = ""
    """Why the form cannot show all of a spec (the YAML then holds the rest)."""


# --- examples, one per line ----------------------------------------------------------------


def _example(line: str) -> Any:
    """A line of the examples field: a JSON object or string as written, else the text."""
    if line.strip().startswith(("{", '"')):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return line
        if isinstance(value, (dict, str)):
            return value
    return line


def examples_of(text: str) -> list[Any]:
    """The examples of the field's ``text``, one per non-blank line."""
    return [_example(line) for line in text.splitlines() if line.strip()]


def examples_text(examples: list[Any]) -> str:
    """The field's text for ``examples``: a text that reads back as itself stays plain, the
    rest (objects, texts that look like JSON or hold a line break) is written as JSON."""

    def line(value: Any) -> str:
        plain = isinstance(value, str) and value.strip() and "\n" not in value
        return (
            value if plain and _example(value) == value else json.dumps(value, ensure_ascii=False)
        )

    return "\n".join(line(value) for value in examples)


# --- form -> spec --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A whole float as an int, so the YAML says ``[0, 1]``, not ``[0.0, 1.0]``."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _task(row: TaskRow) -> dict[str, Any]:
    task: dict[str, Any] = {"kind": row.kind}
    if row.name.strip():
        task["name"] = row.name.strip()
    if row.weight is not None and row.weight != 1:
        task["weight"] = _plain(row.weight)
    data: dict[str, Any] = {}
    # both, when both are given: the spec's check then says to give one
    if row.examples.strip():
        data["examples"] = examples_of(row.examples)
    if row.dataset.strip():
        data["dataset"] = row.dataset.strip()
        if row.file.strip():
            data["file"] = row.file.strip()
    task["data"] = data
    return task


def _wall_time(text: str) -> Any:
    """Seconds as a number, a duration with its unit as written."""
    text = text.strip()
    try:
        return _plain(float(text))
    except ValueError:
        return text


def to_spec(form: SearchForm) -> dict[str, Any]:
    """The spec mapping the form describes; what is left empty is left out."""
    spec: dict[str, Any] = {
        "space": form.space,
        "models": [{"model": model.strip()} for model in form.models if model.strip()],
    }
    if form.base_model.strip():
        spec["base_model"] = form.base_model.strip()
    if form.space != "layers":
        genome: dict[str, Any] = {"method": form.method}
        searched = [p for p in form.search if p.name.strip()]
        if searched:
            genome["search"] = {p.name.strip(): [_plain(p.low), _plain(p.high)] for p in searched}
        spec["parameters"] = genome
    spec["fitness"] = [_task(row) for row in form.tasks]
    budget: dict[str, Any] = {}
    if form.trials is not None:
        budget["trials"] = _plain(form.trials)
    if form.population is not None:
        budget["population"] = _plain(form.population)
    if form.wall_time.strip():
        budget["wall_time"] = _wall_time(form.wall_time)
    spec["budget"] = budget
    return spec


def _extras(previous: Any, shown: set[str]) -> dict[str, Any]:
    return (
        {k: v for k, v in previous.items() if k not in shown} if isinstance(previous, dict) else {}
    )


def carry_over(spec: dict[str, Any], previous: Any) -> dict[str, Any]:
    """Keep what the previous spec held beyond the form: its other top-level keys, the
    genome's other options, and each task's other options and data options (a task matched
    by its place in the list); a data ``path`` only while the form gives no other data."""
    if not isinstance(previous, dict):
        return spec
    if "parameters" in spec:
        spec["parameters"].update(_extras(previous.get("parameters"), GENOME_KEYS))
    earlier = previous.get("fitness")
    earlier = earlier if isinstance(earlier, list) else []
    for task, before in zip(spec["fitness"], earlier, strict=False):
        if not isinstance(before, dict):
            continue
        task.update(_extras(before, TASK_KEYS))
        data = _extras(before.get("data"), DATA_KEYS)
        if task["data"]:
            data.pop("path", None)
        task["data"].update(data)
    return {**spec, **_extras(previous, FORM_KEYS)}


def to_yaml(form: SearchForm, previous_text: str = "") -> str:
    """The form's spec as YAML, keeping what ``previous_text`` held beyond the form."""
    spec = carry_over(to_spec(form), previous_document(previous_text))
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, allow_unicode=True)


# --- spec -> form --------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _models(value: Any, hidden: list[str]) -> list[str]:
    models = []
    for index, entry in enumerate(value if isinstance(value, list) else []):
        reference = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(reference, str):
            models.append(reference)
        else:
            hidden.append(f"models[{index}]")
    return models


def _genome(form: SearchForm, genome: Any, hidden: list[str]) -> None:
    if not isinstance(genome, dict):
        return
    form.method = _text(genome.get("method")) or form.method
    search = genome.get("search")
    for name, bounds in (search if isinstance(search, dict) else {}).items():
        pair = bounds if isinstance(bounds, list) and len(bounds) == 2 else [None, None]
        low, high = _number(pair[0]), _number(pair[1])
        if len(form.search) < MAX_SEARCHED and low is not None and high is not None:
            form.search.append(SearchedParam(str(name), low, high))
        else:
            hidden.append(f"parameters.search.{name}")
    hidden += [f"parameters.{k}" for k in genome if k not in GENOME_KEYS]


def _task_row(task: Any, where: str, hidden: list[str]) -> TaskRow | None:
    if not isinstance(task, dict):
        hidden.append(where)
        return None
    weight = task.get("weight", 1.0)
    row = TaskRow(_text(task.get("kind")), _text(task.get("name")), _number(weight))
    data = task.get("data")
    data = data if isinstance(data, dict) else {}
    examples = data.get("examples")
    if isinstance(examples, list):
        row.examples = examples_text(examples)
    row.dataset, row.file = _text(data.get("dataset")), _text(data.get("file"))
    hidden += [f"{where}.{k}" for k in task if k not in TASK_KEYS]
    hidden += [f"{where}.data.{k}" for k in data if k not in DATA_KEYS]
    return row


def from_spec(data: Any) -> SearchForm:
    """Fill the form from a spec mapping, as far as the form can show it."""
    if not isinstance(data, dict):
        return SearchForm(notice="the spec is not a YAML mapping")
    hidden: list[str] = []
    form = SearchForm(
        space=_text(data.get("space")),
        models=_models(data.get("models"), hidden),
        base_model=_text(data.get("base_model")),
    )
    _genome(form, data.get("parameters"), hidden)
    tasks = data.get("fitness")
    for index, task in enumerate(tasks if isinstance(tasks, list) else []):
        if index >= MAX_TASKS:
            hidden.append(f"fitness[{index}]")
            continue
        row = _task_row(task, f"fitness[{index}]", hidden)
        if row is not None:
            form.tasks.append(row)
    budget = data.get("budget")
    budget = budget if isinstance(budget, dict) else {}
    trials, population = _number(budget.get("trials")), _number(budget.get("population"))
    form.trials = _plain(trials)
    form.population = _plain(population)
    wall_time = budget.get("wall_time")
    form.wall_time = f"{wall_time:g}" if _number(wall_time) is not None else _text(wall_time)
    hidden += [f"budget.{k}" for k in budget if k not in ("trials", "population", "wall_time")]
    hidden += [k for k in data if k not in FORM_KEYS]
    if hidden:
        form.notice = "shown in the YAML tab only: " + ", ".join(hidden)
    return form


# --- examples ------------------------------------------------------------------------------

TEXTS = (
    "the cat sat on the mat.",
    "one, two, three, four.",
    "hello, world!",
    "a merge of two models",
    "numbers: 1 2 3 4 5 6",
    "the quick brown fox",
    "jumps over the lazy dog",
    "merge weights, not data",
    "seven eight nine ten",
    "a small model",
    "evolution finds the weights",
    "fitness per trial",
)
"""Short lines (the demo models read at most 64 characters) for a likelihood fitness."""
SUMS = tuple(
    {"prompt": f"{a}+{b}=", "answer": str(a + b)}
    for a, b in ((1, 2), (2, 3), (3, 4), (4, 4), (5, 2), (6, 3), (2, 7), (4, 5))
)
FIRST_SEARCH = "TIES weights and densities for text likelihood"
FIRST_SEARCH_TRIALS = {DEMO_MODELS: 100, HUB_MODELS: 24}
"""The first example's budget: the demo's tiny models take a twentieth of a second a trial on
an idle CPU (100 trials: long enough to watch the plot grow over several refreshes, and the
best improves to the end); the Hub's take seconds on a GPU."""


def search_examples(models: ExampleModels) -> dict[str, SearchForm]:
    """The search form's examples, naming ``models``; each name says what it searches."""
    a, b, _ = models.fine_tunes
    return {
        FIRST_SEARCH: SearchForm(
            models=[a, b],
            base_model=models.base,
            method="ties",
            search=[SearchedParam("weight", 0, 1), SearchedParam("density", 0.1, 1)],
            tasks=[TaskRow("nll", examples=examples_text(list(TEXTS)))],
            trials=FIRST_SEARCH_TRIALS.get(models, 24),
            population=6,
            wall_time="10m",
        ),
        "Task arithmetic weights for exact answers": SearchForm(
            models=[a, b],
            base_model=models.base,
            method="task_arithmetic",
            search=[SearchedParam("weight", 0, 1)],
            tasks=[TaskRow("exact_match", "sums", examples=examples_text(list(SUMS)))],
            trials=12,
            population=4,
            wall_time="10m",
        ),
    }


# --- a search as it runs and ends ----------------------------------------------------------


def valid_sentence(checked: CheckedSpec) -> str:
    """What Validate says of a spec that passed every check: what it searches, on what data,
    and the commits its sources were pinned to."""
    spec = checked.spec
    what = f"a {spec.space} search"
    if checked.method is not None:
        what += f" ({checked.method.name})"
    tasks = "; ".join(
        f"task {quote.text(t.name)}: {len(t.search)} search and {len(t.held_out)} held-out examples"
        for t in checked.tasks
    )
    pinned = ", ".join(
        f"{ref.path}@{source.revision[:8]}"
        for ref, source in checked.sources.items()
        if source.revision
    )
    return f"✓ valid: {what}, {spec.budget.trials} trials; {tasks}; sources {pinned}"


def progress_html(status: dict[str, Any]) -> str:
    """Trials done of the budget, the best fitness so far and what is left of the wall-time
    budget (``budget.wall_time`` less the time searched: a bound, not an estimate of when the
    search ends), each in a span of its own class (``done``, ``budget``, ``best``,
    ``time-left``)."""
    best = status["best"]
    shown = fitness_text(best["fitness"]) if best else "—"
    left = status["seconds_left"]
    time_left = (
        f" · wall-time budget left <span class='time-left'>{duration(left)}</span>" if left else ""
    )
    return (
        f"<p class='search-progress'><span class='done'>{status['done']}</span> of "
        f"<span class='budget'>{status['budget']}</span> trials · best fitness "
        f"<span class='best'>{shown}</span>{time_left}</p>"
    )


def genes_yaml(status: dict[str, Any]) -> str:
    """The best trial's genes (its merge parameters per model and layer group) as YAML."""
    best = status["best"]
    if not best:
        return ""
    genes = {name: round(value, 4) for name, value in best["params"].items()}
    return yaml.safe_dump({"stage": best["stage"], "genes": genes}, sort_keys=False)


def plotted(status: dict[str, Any]) -> tuple[list[TrialRecord], list[Baseline]]:
    """The trials and baselines of a search's status as :func:`fitness_figure` draws them
    (the live plot is the card's): what the plot does not show (genes, scores, times) is left
    empty rather than read again."""
    trials = [
        TrialRecord(t["number"], t["stage"], {}, t["fitness"], {}, 0.0, 0.0, t["worker"])
        for t in status["trials"]
    ]
    sources = [Baseline(b["model"], b["search"], b["held_out"], {}) for b in status["baselines"]]
    return trials, sources


def fitness_table(outcome: dict[str, Any]) -> str:
    """A finished search's fitness table as HTML, the winner first, its numbers as the card
    writes them."""
    cells = "".join(
        f"<tr><td>{html.escape(str(row['model']))}</td><td>{fitness_text(row['search'])}</td>"
        f"<td>{fitness_text(row['held_out'])}</td></tr>"
        for row in outcome.get("rows", [])
    )
    return (
        "<table class='fitness'><tr><th>model</th><th>search fitness</th>"
        f"<th>held-out fitness</th></tr>{cells}</table>"
    )
