"""The Space's Gradio Blocks. Thin on purpose: values move between the widgets and
:mod:`service.recipe_form`; validating and merging go through :class:`service.jobs.JobService`,
the same path as every other origin; the job panel polls the job table with a ``gr.Timer``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import gradio as gr
import yaml

from merge_engine.errors import MergeError
from merge_engine.evolve.report import fitness_figure
from merge_engine.evolve.spec import SPACES, TASK_KINDS
from merge_engine.hub_names import is_loopback
from merge_engine.methods import all_methods, get_method
from service.intake import Identity, MergeRequest, SearchRequest
from service.job_store import ACTIVE, Job
from service.jobs import JobService
from service.recipe_form import (
    DEMO_MODELS,
    DTYPES,
    FIRST_EXAMPLE,
    GLOBAL_PARAMS,
    HUB_MODELS,
    LAYERS_HELP,
    LAYERS_LABEL,
    MAX_MODELS,
    PER_MODEL_PARAMS,
    MergeForm,
    ModelRow,
    error_place,
    examples,
    field_line,
    from_recipe,
    method_params,
    param_help,
    switch_method,
    to_yaml,
)
from service.search_form import (
    EXAMPLES_HELP,
    FIRST_SEARCH,
    MAX_SEARCHED,
    MAX_TASKS,
    SEARCH_METHODS,
    SEARCHABLE,
    SearchedParam,
    SearchForm,
    TaskRow,
    fitness_table,
    from_spec,
    genes_yaml,
    plotted,
    progress_html,
    search_examples,
    valid_sentence,
)
from service.search_form import to_yaml as spec_yaml

PLACES = (
    "form",
    "method",
    "parameters",
    "base_model",
    *(f"model-{i}" for i in range(MAX_MODELS)),
    "models",
    "dtype",
    "target",
    "recipe",
)
"""Where an error can be shown: next to a field of the form, at the top of the form (``form``:
what the form cannot show), under the target, or under the YAML (``recipe``)."""
POLL_SECONDS = 1.0
JOB_COLUMNS = ["job", "kind", "status", "stage", "progress", "target"]


def _param_widget(param, elem: str) -> gr.components.Component:
    """A field for a registry parameter name, of its type; shown, and given its help text
    (what it does, bounds, default), per method by :meth:`MergeFormWidgets.write`, since
    methods sharing a name each declare it their own way."""
    label = param.name
    info = param_help(param)
    if param.type is bool:
        return gr.Checkbox(label=label, info=info, elem_id=elem, visible=False)
    if param.choices:
        return gr.Dropdown(list(param.choices), label=label, info=info, elem_id=elem, visible=False)
    return gr.Number(label=label, info=info, elem_id=elem, visible=False)


@dataclass
class Row:
    box: gr.Group
    repo: gr.Textbox
    revision: gr.Textbox
    layers: gr.Textbox
    params: dict[str, gr.components.Component]
    remove: gr.Button


class MergeFormWidgets:
    """The form's widgets, and the conversions between their values and a MergeForm."""

    def __init__(self) -> None:
        self.method = gr.Dropdown(
            [m.name for m in all_methods()], value="ties", label="Method", elem_id="method"
        )
        self.method_doc = gr.Markdown()
        self.errors: dict[str, gr.Markdown] = {}
        self.errors["form"] = gr.Markdown(elem_id="error-form")
        self.errors["method"] = gr.Markdown(elem_id="error-method")
        with gr.Row():
            self.params = {
                name: _param_widget(p, f"param-{name}") for name, p in GLOBAL_PARAMS.items()
            }
        self.errors["parameters"] = gr.Markdown(elem_id="error-parameters")
        self.base_model = gr.Textbox(
            label="Base model", placeholder="org/name or org/name@revision", elem_id="base-model"
        )
        self.errors["base_model"] = gr.Markdown(elem_id="error-base_model")
        self.rows: list[Row] = []
        self.shown = gr.State(2)
        for i in range(MAX_MODELS):
            with gr.Group(visible=i < 2) as box:
                with gr.Row():
                    repo = gr.Textbox(
                        label=f"Model {i + 1}",
                        placeholder="org/name",
                        elem_id=f"model-{i}-repo",
                        scale=3,
                    )
                    revision = gr.Textbox(
                        label="revision", placeholder="main", elem_id=f"model-{i}-revision"
                    )
                    layers = gr.Textbox(
                        label=LAYERS_LABEL,
                        info=LAYERS_HELP,
                        placeholder="all, or 0-16",
                        elem_id=f"model-{i}-layers",
                    )
                    params = {
                        name: _param_widget(param, f"model-{i}-{name}")
                        for name, param in PER_MODEL_PARAMS.items()
                    }
                    remove = gr.Button("Remove", size="sm", elem_id=f"model-{i}-remove")
                self.errors[f"model-{i}"] = gr.Markdown(elem_id=f"error-model-{i}")
            self.rows.append(Row(box, repo, revision, layers, params, remove))
        self.add = gr.Button("Add model", size="sm", elem_id="add-model")
        self.errors["models"] = gr.Markdown(elem_id="error-models")
        self.dtype = gr.Dropdown(DTYPES, value="", label="dtype (computation)", elem_id="dtype")
        self.errors["dtype"] = gr.Markdown(elem_id="error-dtype")
        self.notice = gr.Markdown(elem_id="form-notice")

    # --- values in, values out ------------------------------------------------------------

    @property
    def inputs(self) -> list[gr.components.Component]:
        widgets = [self.method, *self.params.values(), self.base_model, self.dtype, self.shown]
        for row in self.rows:
            widgets += [row.repo, row.revision, row.layers, *row.params.values()]
        return widgets

    def read(self, values: list[Any]) -> MergeForm:
        values = list(values)
        method = values.pop(0)
        params = {name: values.pop(0) for name in self.params}
        base, dtype, shown = values.pop(0), values.pop(0), values.pop(0)
        rows = []
        for _ in self.rows:
            repo, revision, layers = values.pop(0), values.pop(0), values.pop(0)
            row_params = {name: values.pop(0) for name in PER_MODEL_PARAMS}
            rows.append(ModelRow(repo or "", revision or "", layers or "", row_params))
        return MergeForm(method or "", params, rows[:shown], base or "", dtype or "")

    @property
    def outputs(self) -> list[gr.components.Component]:
        widgets = [self.method, self.method_doc, *self.params.values(), self.base_model]
        widgets += [self.dtype, self.shown, self.notice]
        for row in self.rows:
            widgets += [row.box, row.repo, row.revision, row.layers, *row.params.values()]
        return widgets

    def write(self, form: MergeForm) -> list[Any]:
        """Updates for ``outputs`` that show ``form``: values, and which fields the method has."""
        declared = method_params(form.method, "global")
        per_model = method_params(form.method, "per_model")
        shown = max(1, min(len(form.models), MAX_MODELS))
        updates: list[Any] = [form.method, _method_doc(form.method)]
        for name in self.params:
            param = declared.get(name)
            value = form.params.get(
                name, None if param is None or param.required else param.default
            )
            updates.append(_shown(param, value))
        updates += [form.base_model, form.dtype, shown, form.notice]
        for i, _ in enumerate(self.rows):
            row = form.models[i] if i < len(form.models) else ModelRow()
            updates += [gr.update(visible=i < shown), row.repo, row.revision, row.layers]
            updates += [
                _shown(per_model.get(name), row.params.get(name)) for name in PER_MODEL_PARAMS
            ]
        return updates


def _shown(param, value: Any) -> Any:
    """The update of a parameter's field: hidden when the method lacks it, else with the
    method's own help text."""
    if param is None:
        return gr.update(value=value, visible=False)
    return gr.update(value=value, visible=True, info=param_help(param))


def _say(text: str) -> str:
    """``text`` as Markdown that shows every character of it: no HTML tag (``<stream end>``)
    or Markdown emphasis swallowed; line breaks kept."""
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_{}\[\]#|~!])", r"\\\1", text)
    return "  \n".join(line.strip() for line in text.splitlines())


def _method_doc(name: str) -> str:
    try:
        method = get_method(name)
    except Exception:  # noqa: BLE001
        return ""
    base = {
        "required": "needs a base model",
        "optional": "a base model is optional",
        "unused": "takes no base model",
    }[method.base]
    paper = f" — [{method.paper}]({method.paper})" if method.paper else ""
    data = (
        "; needs calibration data: add a `calibration` block (a Hub `dataset` or inline "
        "`examples`) in the YAML tab"
        if method.needs_data
        else ""
    )
    return f"**{method.pretty_name}**: {method.doc}; {base}{data}{paper}"


def _identity(service: JobService, token: gr.OAuthToken | None) -> Identity:
    return service.identities.of(token.token if token else None)


def _job_rows(jobs: list[Job]) -> list[list[Any]]:
    return [[j.id, j.kind, j.status, j.stage, f"{j.progress:.0%}", j.target] for j in jobs]


def _job_sentence(job: Job) -> str:
    """The line under the buttons about ``job``, kept up to date by the poll."""
    verb = {
        "queued": "is queued",
        "running": "is running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "was cancelled",
    }.get(job.status, f"is {job.status}")
    if job.finish_early and job.status == "running":
        verb = "is stopping after its current trial to publish the best so far"
    return f"Job {job.id} {verb}."


STAGE_DONE = re.compile(r"^(?P<stage>[\w-]+): done in (?P<seconds>[\d.]+) s$")
BAR_CSS = (
    "<style>.job-bars .bar{display:flex;gap:.6em;align-items:center;margin:.15em 0}"
    ".job-bars .bar span:first-child{width:7em}.job-bars progress{flex:1;height:.9em}"
    ".job-bars .bar span:last-child{width:3.5em;text-align:right}"
    ".job-bars .overall{font-weight:bold}</style>"
)


def _bar(label: str, fraction: float, kind: str = "stage") -> str:
    name = html.escape(label)
    return (
        f'<div class="bar {kind}" data-stage="{name}"><span>{name}</span>'
        f'<progress value="{fraction:.3f}" max="1" aria-label="{name}"></progress>'
        f"<span>{fraction:.0%}</span></div>"
    )


def _stage_times(job: Job) -> dict[str, float]:
    """Seconds each finished stage took, from the job's log lines ``merge: done in 1.2 s``."""
    times = {}
    for line in job.log:
        found = STAGE_DONE.match(line)
        if found and found["stage"] in job.stages:
            times[found["stage"]] = float(found["seconds"])
    return times


def _stage_fractions(job: Job) -> list[tuple[str, float]]:
    times = _stage_times(job)
    current = job.stages.index(job.stage) if job.stage in job.stages else -1
    fractions = []
    for index, stage in enumerate(job.stages):
        if job.status == "succeeded" or stage in times or index < current:
            fractions.append((stage, 1.0))
        elif index == current:
            fractions.append((stage, min(max(job.fraction, 0.0), 1.0)))
        else:
            fractions.append((stage, 0.0))
    return fractions


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.1f} kB"


def _summary(job: Job) -> str:
    """What a finished job made: method, the pinned sources, its size, the time of each
    stage."""
    try:
        recipe = yaml.safe_load(job.recipe) or {}
    except yaml.YAMLError:
        recipe = {}
    method = recipe.get("merge_method", "?") if isinstance(recipe, dict) else "?"
    sources = ", ".join(f"{repo}@{commit[:8]}" for repo, commit in job.sources.items())
    times = _stage_times(job)
    timing = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in times.items())
    items = [
        f"<li>method: <b>{html.escape(str(method))}</b></li>",
        f"<li>sources pinned: {html.escape(sources or 'none')}</li>",
    ]
    if job.output_bytes:
        items.append(f"<li>size: {_bytes(job.output_bytes)} of weights</li>")
    if times:
        total = sum(times.values())
        items.append(f"<li>time: {html.escape(timing)} (total {total:.1f} s)</li>")
    return f'<ul class="summary">{"".join(items)}</ul>'


def _job_status_html(job: Job) -> str:
    head = (
        f"<p><b>{html.escape(job.status)}</b> · stage <b>{html.escape(job.stage)}</b> · "
        f"{job.progress:.0%}</p>"
    )
    bars = _bar("overall", job.progress, "overall") + "".join(
        _bar(stage, fraction) for stage, fraction in _stage_fractions(job)
    )
    error = f'<p class="error">{html.escape(job.error)}</p>' if job.error else ""
    summary = ""
    if job.kind == "search" and job.outcome:
        summary = fitness_table(job.outcome)  # also of a search stopped after its search stage
    elif job.status == "succeeded":
        summary = _summary(job)
    return f'{BAR_CSS}<div class="job-bars">{head}{bars}{error}{summary}</div>'


def _job_panel(job: Job | None) -> tuple[str, str, str, str]:
    if job is None:
        return "", "", "", ""
    link = f"[{job.target}]({job.url})" if job.url else ""
    return _job_status_html(job), "\n".join(job.log), link, _card_shown(job)


WHERE = {
    "form": "at the top of the form",
    "method": "by the method",
    "parameters": "by the method's parameters",
    "base_model": "by the base model",
    "models": "under the models",
    "dtype": "by the dtype",
    "target": "under the target repo",
    "recipe": "under the YAML",
}


def _where(box: str) -> str:
    if box.startswith("model-"):
        return f"under model {int(box.split('-')[1]) + 1}"
    return WHERE[box]


def _visible_job(service: JobService, job_id: str, profile: gr.OAuthProfile | None) -> Job | None:
    """The job ``job_id`` names, unless the signed-in person may not see it."""
    job = service.get(job_id.strip()) if job_id and job_id.strip() else None
    return job if job and _may_see(job, profile) else None


def _may_see(job: Job, profile: gr.OAuthProfile | None) -> bool:
    """A private job's card and log are its signed-in requester's only."""
    return not job.private or (profile is not None and job.requester == profile.username)


def _search_view(
    service: JobService, job_id: str, profile: gr.OAuthProfile | None
) -> tuple[Job | None, dict]:
    """The job ``job_id`` names and, for a search, its status, through the service's cache
    that the API reads too: however many pages watch a search, its trials are read at most
    once a second."""
    if not job_id or not job_id.strip():
        return None, {}
    hit, view = service.searches.cached(job_id.strip())
    if not hit:
        view = service.searches.load(job_id.strip())
    if view is None or not _may_see(view.job, profile):
        return None, {}
    return view.job, view.data


def _followed(job: Job | None, said: str) -> Any:
    """The line under the buttons, following ``job`` once it speaks of it."""
    if job and re.match(rf"Job {re.escape(job.id)}\b", said or "") and said != _job_sentence(job):
        return _job_sentence(job)
    return gr.skip()


def _stop(
    service: JobService, job_id: str, token: gr.OAuthToken | None, publish_best: bool = False
) -> str:
    """Cancel a job, or stop a search and publish its best so far; what happened, in a line."""
    try:
        job = service.cancel(job_id.strip(), _identity(service, token), publish_best)
    except MergeError as error:
        return f"⚠ {_say(str(error))}"
    finally:
        service.searches.forget(job_id.strip())
    if job.finish_early and job.status == "running":
        return _job_sentence(job)
    return f"Job {job.id}: {'cancel requested' if job.status in ACTIVE else job.status}."


def _greeting(bot_namespace: str | None, profile: gr.OAuthProfile | None) -> tuple[str, str]:
    """Who the page speaks to, and the namespace their results go to ("" when none)."""
    if profile:
        said = (
            f"Signed in as **{profile.username}**: results go to your namespace, with your token."
        )
        return said, profile.username
    if bot_namespace:
        said = f"Not signed in: results go to **{bot_namespace}/…**, one job at a time for everyone not signed in."
        return said, bot_namespace
    return "Sign in with Hugging Face to merge: this bot has no namespace of its own.", ""


def _latest(service: JobService, profile: gr.OAuthProfile | None, kind: str) -> str:
    """The signed-in person's latest job of ``kind``, for a browser that followed none."""
    if not profile:
        return ""
    own = [job for job in service.list(requester=profile.username, limit=20) if job.kind == kind]
    return own[0].id if own else ""


def _card_shown(job: Job) -> str:
    """The job's card as the page shows it: without its metadata block, and with its images
    (a search's fitness plot) read from the published repo, not from this page's address."""
    card = re.sub(r"\A---\n.*?\n---\n", "", job.card or "", flags=re.DOTALL)
    if not job.url:
        return card
    base = f"{job.url}/resolve/{job.commit or 'main'}/"
    return re.sub(r"!\[([^\]]*)\]\((?![a-z]+:)([^)\s]+)\)", rf"![\1]({base}\2)", card)


def _remember(current: str) -> Any:
    """The job id to keep in the browser, when there is one."""
    return current.strip() if current and current.strip() else gr.skip()


@dataclass
class TaskWidgets:
    box: gr.Group
    kind: gr.Dropdown
    name: gr.Textbox
    weight: gr.Number
    examples: gr.Textbox
    dataset: gr.Textbox
    file: gr.Textbox
    remove: gr.Button

    @property
    def fields(self) -> list[gr.components.Component]:
        return [self.kind, self.name, self.weight, self.examples, self.dataset, self.file]


class SearchFormWidgets:
    """The search form's widgets, and the conversions between their values and a SearchForm.
    Its dropdowns take any value: one the YAML names that the form does not offer stays, for
    Validate to name, instead of Gradio refusing every later edit of the form."""

    def __init__(self) -> None:
        with gr.Row():
            self.space = gr.Dropdown(
                list(SPACES),
                value="parameters",
                label="Space",
                allow_custom_value=True,
                info="parameters: per-layer merge parameters; layers: a layer path; both: one, then the other",
                elem_id="search-space",
            )
            self.method = gr.Dropdown(
                SEARCH_METHODS,
                value="ties",
                label="Method",
                allow_custom_value=True,
                info="the merge whose parameters are searched",
                elem_id="search-method",
            )
        self.sources = gr.Textbox(
            label="Sources",
            info="Hub models, one per line: org/name or org/name@revision",
            lines=2,
            elem_id="search-sources",
        )
        self.base_model = gr.Textbox(
            label="Base model",
            placeholder="org/name or org/name@revision",
            elem_id="search-base-model",
        )
        gr.Markdown(
            "**Searched parameters** and their bounds, one value per model and layer group; "
            "rows without a name are skipped, and with none the search takes weight in "
            "[0, 1] and density in [0.1, 1] where the method has them."
        )
        self.searched = []
        for i in range(MAX_SEARCHED):
            with gr.Row():
                self.searched.append(
                    (
                        gr.Dropdown(
                            ["", *SEARCHABLE],
                            value="",
                            allow_custom_value=True,
                            label="parameter",
                            elem_id=f"search-param-{i}-name",
                        ),
                        gr.Number(label="low", elem_id=f"search-param-{i}-low"),
                        gr.Number(label="high", elem_id=f"search-param-{i}-high"),
                    )
                )
        self.shown = gr.State(1)
        self.tasks = [self._task(i) for i in range(MAX_TASKS)]
        self.add_task = gr.Button("Add task", size="sm", elem_id="search-add-task")
        with gr.Row():
            self.trials = gr.Number(label="trials", precision=0, elem_id="search-trials")
            self.population = gr.Number(
                label="population",
                info="CMA-ES population, 4 or more; empty: 4 + 3 ln n",
                precision=0,
                elem_id="search-population",
            )
            self.wall_time = gr.Textbox(
                label="wall time",
                placeholder="600, 90s, 30m or 2h",
                info="empty: the bot's limit",
                elem_id="search-wall-time",
            )
        self.notice = gr.Markdown(elem_id="search-notice")

    @staticmethod
    def _task(i: int) -> TaskWidgets:
        with gr.Group(visible=i < 1) as box:
            with gr.Row():
                kind = gr.Dropdown(
                    list(TASK_KINDS),
                    value="nll",
                    label=f"Fitness task {i + 1}",
                    allow_custom_value=True,
                    elem_id=f"search-task-{i}-kind",
                )
                name = gr.Textbox(
                    label="name", placeholder="its kind", elem_id=f"search-task-{i}-name"
                )
                weight = gr.Number(value=1, label="weight", elem_id=f"search-task-{i}-weight")
                remove = gr.Button(
                    "Remove", size="sm", scale=0, min_width=90, elem_id=f"search-task-{i}-remove"
                )
            examples = gr.Textbox(
                label="examples", info=EXAMPLES_HELP, lines=4, elem_id=f"search-task-{i}-examples"
            )
            with gr.Row():
                dataset = gr.Textbox(
                    label="or a Hub dataset",
                    placeholder="org/name or org/name@revision",
                    elem_id=f"search-task-{i}-dataset",
                )
                file = gr.Textbox(
                    label="file in the dataset",
                    placeholder="when it holds several: data/train.jsonl",
                    elem_id=f"search-task-{i}-file",
                )
        return TaskWidgets(box, kind, name, weight, examples, dataset, file, remove)

    @property
    def inputs(self) -> list[gr.components.Component]:
        widgets = [self.space, self.method, self.sources, self.base_model]
        widgets += [widget for row in self.searched for widget in row]
        widgets += [self.trials, self.population, self.wall_time, self.shown]
        return widgets + [widget for task in self.tasks for widget in task.fields]

    def read(self, values: list[Any]) -> SearchForm:
        values = list(values)
        space, method, sources, base = (values.pop(0) for _ in range(4))
        rows = [(values.pop(0), values.pop(0), values.pop(0)) for _ in self.searched]
        searched = [SearchedParam(n, low, high) for n, low, high in rows if n and n.strip()]
        trials, population, wall_time, shown = (values.pop(0) for _ in range(4))
        tasks = []
        for _ in self.tasks:
            kind, name, weight, examples, dataset, file = (values.pop(0) for _ in range(6))
            tasks.append(
                TaskRow(kind or "", name or "", weight, examples or "", dataset or "", file or "")
            )
        return SearchForm(
            space=space or "",
            models=[line.strip() for line in (sources or "").splitlines() if line.strip()],
            base_model=base or "",
            method=method or "",
            search=searched,
            tasks=tasks[:shown],
            trials=trials,
            population=population,
            wall_time=wall_time or "",
        )

    @property
    def outputs(self) -> list[gr.components.Component]:
        widgets = [self.space, self.method, self.sources, self.base_model]
        widgets += [widget for row in self.searched for widget in row]
        widgets += [self.trials, self.population, self.wall_time, self.shown, self.notice]
        return widgets + [widget for task in self.tasks for widget in (task.box, *task.fields)]

    def write(self, form: SearchForm) -> list[Any]:
        """Updates for ``outputs`` that show ``form``."""
        shown = max(1, min(len(form.tasks), MAX_TASKS))
        updates: list[Any] = [form.space, form.method, "\n".join(form.models), form.base_model]
        for i, _ in enumerate(self.searched):
            param = form.search[i] if i < len(form.search) else SearchedParam()
            updates += [param.name, param.low, param.high]
        updates += [form.trials, form.population, form.wall_time, shown, form.notice]
        for i, _ in enumerate(self.tasks):
            task = form.tasks[i] if i < len(form.tasks) else TaskRow()
            updates += [gr.update(visible=i < shown), task.kind, task.name, task.weight]
            updates += [task.examples, task.dataset, task.file]
        return updates


def build_search_tab(service: JobService, blocks: gr.Blocks, last: gr.BrowserState) -> gr.Textbox:
    """The Search tab's widgets and events (inside ``gr.Tabs``): the form and its YAML,
    Validate and Start, and the running search's panel, polled like the merge's. Returns the
    search job's field, which the Jobs tab fills."""
    loopback = is_loopback(service.settings.endpoint)
    example_forms = search_examples(DEMO_MODELS if loopback else HUB_MODELS)
    gr.Markdown(
        "Search a merge instead of guessing it: an evolutionary search (CMA-ES) tries merges "
        "of the sources, scores each on your fitness tasks, and publishes the best with a card "
        "that compares it with every source. The YAML tab takes the whole spec (`docs/evolve.md`)."
    )
    with gr.Row():
        example = gr.Dropdown(list(example_forms), label="Examples", elem_id="search-example")
        load_example = gr.Button("Load example", elem_id="load-search-example")
    with gr.Tab("Form", elem_id="search-form-tab"):
        form = SearchFormWidgets()
    with gr.Tab("YAML", elem_id="search-yaml-tab"):
        spec = gr.Textbox(label="Search spec (YAML)", lines=22, elem_id="search-yaml")
        yaml_error = gr.Markdown(elem_id="search-yaml-error")
    target = gr.Textbox(label="Target repo", placeholder="namespace/name", elem_id="search-target")
    private = gr.Checkbox(label="Private", elem_id="search-private")
    with gr.Row():
        validate = gr.Button("Validate", elem_id="search-validate")
        start = gr.Button("Start search", variant="primary", elem_id="search-start")
    outcome = gr.Markdown(elem_id="search-outcome")
    job_id = gr.Textbox(label="Search job", elem_id="search-job-id")
    status = gr.HTML(elem_id="search-status")
    plot = gr.Plot(label="Fitness per trial", elem_id="search-plot")
    best = gr.Code(
        language="yaml",
        label="Current best recipe: the best trial's genes",
        interactive=False,
        elem_id="search-best",
    )
    with gr.Row():
        cancel = gr.Button("Cancel search", elem_id="search-cancel")
        publish = gr.Button("Stop and publish the best so far", elem_id="search-publish-best")
    link = gr.Markdown(elem_id="search-link")
    with gr.Accordion("Model card", open=True):
        card = gr.Markdown(elem_id="search-card")
    log = gr.Textbox(label="Log", lines=6, elem_id="search-log")
    drawn = gr.State("")
    """Which trials the plot shows, so a poll that finds nothing new leaves it be."""

    # --- the form and the YAML, each writing the other ------------------------------------

    def form_to_yaml(*values: Any) -> str:
        return spec_yaml(form.read(values[:-1]), values[-1])

    def yaml_to_form(text: str) -> list[Any]:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            return [gr.skip()] * len(form.outputs) + [f"⚠ {_say(_yaml_problem(error))}"]
        return [*form.write(from_spec(data)), ""]

    def show_example(name: str | None) -> list[Any]:
        chosen = example_forms.get(name or "", SearchForm())
        return [*form.write(chosen), spec_yaml(chosen), "", "", ""]

    def add_task(*values: Any) -> list[Any]:
        current = form.read(values[:-1])
        current.tasks.append(TaskRow())
        return [*form.write(current), spec_yaml(current, values[-1])]

    for widget in form.inputs:
        if not isinstance(widget, gr.State):
            widget.input(form_to_yaml, [*form.inputs, spec], spec)
    spec.input(yaml_to_form, spec, [*form.outputs, yaml_error])
    load_example.click(show_example, example, [*form.outputs, spec, yaml_error, outcome, job_id])
    form.add_task.click(add_task, [*form.inputs, spec], [*form.outputs, spec])
    for index, task in enumerate(form.tasks):

        def remove_task(*values: Any, index: int = index) -> list[Any]:
            current = form.read(values[:-1])
            del current.tasks[index : index + 1]
            return [*form.write(current), spec_yaml(current, values[-1])]

        task.remove.click(remove_task, [*form.inputs, spec], [*form.outputs, spec])

    # --- validate, start, follow the search -----------------------------------------------

    def request_of(text: str, target_name: str, is_private: bool, identity: Identity):
        spec_read = service.read_spec(text)
        return SearchRequest(spec_read, target_name.strip(), identity.name, "form", is_private)

    def check(text: str, target_name: str, is_private: bool, token: gr.OAuthToken | None) -> str:
        try:
            identity = _identity(service, token)
            checked, _ = service.check_search(
                request_of(text, target_name, is_private, identity), identity
            )
        except MergeError as error:
            return f"⚠ Not valid: {_spec_error(error, text)}"
        return valid_sentence(checked)

    def submit(
        text: str, target_name: str, is_private: bool, token: gr.OAuthToken | None
    ) -> list[Any]:
        try:
            identity = _identity(service, token)
            job = service.submit_search(
                request_of(text, target_name, is_private, identity), identity
            )
        except MergeError as error:
            return [f"⚠ Not started: {_spec_error(error, text)}", gr.skip()]
        service.searches.forget(job.id)  # a search that ran before under this id starts anew
        return [_job_sentence(job), job.id]

    validate.click(check, [spec, target, private], outcome)
    start.click(submit, [spec, target, private], [outcome, job_id])

    def poll(current: str, said: str, before: str, profile: gr.OAuthProfile | None) -> list[Any]:
        job, status = _search_view(service, current, profile)
        if job is None:
            return [gr.skip()] * 8 if not before else ["", None, "", "", "", "", gr.skip(), ""]
        panel, plot_value, genes, now = _search_panel(job, status, before)
        link_text = f"[{job.target}]({job.url})" if job.url else ""
        log_text = "\n".join(job.log)
        return [
            panel,
            plot_value,
            genes,
            link_text,
            _card_shown(job),
            log_text,
            _followed(job, said),
            now,
        ]

    gr.Timer(POLL_SECONDS).tick(
        poll, [job_id, outcome, drawn], [status, plot, best, link, card, log, outcome, drawn]
    )

    def stop_search(current: str, token: gr.OAuthToken | None) -> str:
        return _stop(service, current, token)

    def publish_best(current: str, token: gr.OAuthToken | None) -> str:
        return _stop(service, current, token, publish_best=True)

    cancel.click(stop_search, job_id, outcome)
    publish.click(publish_best, job_id, outcome)

    job_id.change(_remember, job_id, last)

    def on_load(followed: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
        start_form = example_forms[FIRST_SEARCH]
        _, namespace = _greeting(service.settings.bot_namespace, profile)
        return [
            f"{namespace}/searched-model" if namespace else "",
            FIRST_SEARCH,
            *form.write(start_form),
            spec_yaml(start_form),
            followed or _latest(service, profile, "search"),
        ]

    blocks.load(on_load, last, [target, example, *form.outputs, spec, job_id])
    return job_id


def _spec_error(error: MergeError, text: str) -> str:
    """The error's sentence, with the line of the YAML that the field it names is on."""
    field = getattr(error, "field", None)
    line = field_line(text, field) if field else None
    return _say(str(error)) + (f" (line {line} of the YAML)" if line else "")


def _search_panel(job: Job, status: dict, drawn: str) -> tuple[str, Any, Any, str]:
    """The status (stage bars, trials done of the budget, best so far, time left), the
    fitness plot (each trial, the best so far, and the sources' fitness once the search has
    scored them, before its first trial) and the best genes of ``job``; the plot and genes are
    drawn again only when that changed since ``drawn``."""
    if job.kind != "search":
        return _job_status_html(job), None, "", ""
    now = f"{job.id}.{job.attempt}:{status['done']}:{len(status['baselines'])}"
    panel = progress_html(status) + _job_status_html(job)
    if now == drawn:
        return panel, gr.skip(), gr.skip(), now
    trials, sources = plotted(status)
    figure = fitness_figure(trials, sources) if trials or sources else None
    return panel, figure, genes_yaml(status), now


def build_blocks(service: JobService) -> gr.Blocks:
    settings = service.settings
    # the offline demo's sandbox hub has its own tiny models; the Hub has real, small ones
    example_forms = examples(DEMO_MODELS if is_loopback(settings.endpoint) else HUB_MODELS)
    with gr.Blocks(title="mergebot") as blocks:
        gr.Markdown(
            "# mergebot\nMerge fine-tuned models into one, without training data: pick a method, "
            "list the models, validate in seconds, merge, and get a repo with a model card."
        )
        with gr.Row():
            gr.LoginButton()
            who = gr.Markdown(elem_id="who")
        last_job = gr.BrowserState("", storage_key="mergebot-last-job")
        last_search = gr.BrowserState("", storage_key="mergebot-last-search")
        # which tab, Form or YAML, the person is on: set in the browser (no round trip), so
        # a Validate right after switching tabs already knows it
        tab = gr.Textbox("form", visible=False)
        with gr.Tabs() as tabs:
            with gr.Tab("New merge", id="new"):
                with gr.Row():
                    example = gr.Dropdown(list(example_forms), label="Examples", elem_id="example")
                    load_example = gr.Button("Load example", elem_id="load-example")
                with gr.Tab("Form") as form_tab:
                    form = MergeFormWidgets()
                with gr.Tab("YAML", elem_id="yaml-tab") as yaml_tab:
                    recipe = gr.Textbox(label="Recipe (YAML)", lines=18, elem_id="recipe-yaml")
                    form.errors["recipe"] = gr.Markdown(elem_id="error-recipe")
                target = gr.Textbox(
                    label="Target repo", placeholder="namespace/name", elem_id="target"
                )
                form.errors["target"] = gr.Markdown(elem_id="error-target")
                with gr.Row():
                    private = gr.Checkbox(label="Private", elem_id="private")
                    follow = gr.Checkbox(
                        label="Follow source updates (merge again when a source changes)",
                        elem_id="follow",
                    )
                with gr.Row():
                    validate = gr.Button("Validate", elem_id="validate")
                    merge = gr.Button("Merge", variant="primary", elem_id="merge")
                outcome = gr.Markdown(elem_id="outcome")
                job_id = gr.Textbox(label="Job", elem_id="job-id")
                job_status = gr.HTML(elem_id="job-status")
                job_link = gr.Markdown(elem_id="job-link")
                job_log = gr.Textbox(label="Log", lines=8, elem_id="job-log")
                with gr.Row():
                    cancel = gr.Button("Cancel job", elem_id="cancel")
                    following = gr.Button(
                        "Stop / restart following the sources", elem_id="following"
                    )
                with gr.Accordion("Model card", open=False):
                    job_card = gr.Markdown(elem_id="job-card")
            with gr.Tab("Search", id="search", elem_id="search-tab"):
                search_job_id = build_search_tab(service, blocks, last_search)
            with gr.Tab("Jobs", id="jobs"):
                gr.Markdown(
                    "Click a row to open that job (its progress, log and card): a merge in the "
                    "**New merge** tab, a search in the **Search** tab.",
                    elem_id="jobs-help",
                )
                mine = gr.Dataframe(
                    headers=JOB_COLUMNS, label="Your jobs", interactive=False, elem_id="my-jobs"
                )
                public = gr.Dataframe(
                    headers=JOB_COLUMNS,
                    label="Recent public jobs",
                    interactive=False,
                    elem_id="public-jobs",
                )
        errors = [form.errors[place] for place in PLACES]
        form_tab.select(None, None, tab, js="() => 'form'")
        yaml_tab.select(None, None, tab, js="() => 'yaml'")

        # --- the form and the YAML, each writing the other --------------------------------

        def form_to_yaml(*values: Any) -> str:
            return to_yaml(form.read(values[:-1]), values[-1])

        def yaml_to_form(text: str) -> list[Any]:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                return [gr.skip()] * len(form.outputs) + [f"⚠ {_say(_yaml_problem(error))}"]
            return [*form.write(from_recipe(data)), ""]

        def method_changed(*values: Any) -> list[Any]:
            previous = _safe_load(values[-1])
            before = previous.get("merge_method") if isinstance(previous, dict) else None
            current = switch_method(form.read(values[:-1]), str(before or ""))
            return [*form.write(current), to_yaml(current, values[-1])]

        def show_example(name: str | None) -> list[Any]:
            chosen = example_forms.get(name or "", MergeForm())
            # a fresh start: no error, outcome or job of what was there before
            return [*form.write(chosen), to_yaml(chosen), *([""] * len(PLACES)), "", ""]

        def add_model(*values: Any) -> list[Any]:
            current = form.read(values[:-1])
            current.models.append(ModelRow())
            return [*form.write(current), to_yaml(current, values[-1])]

        for widget in form.inputs:
            if widget is not form.method and not isinstance(widget, gr.State):
                widget.input(form_to_yaml, [*form.inputs, recipe], recipe)
        form.method.input(method_changed, [*form.inputs, recipe], [*form.outputs, recipe])
        recipe.input(yaml_to_form, recipe, [*form.outputs, form.errors["recipe"]])
        load_example.click(show_example, example, [*form.outputs, recipe, *errors, outcome, job_id])
        form.add.click(add_model, [*form.inputs, recipe], [*form.outputs, recipe])
        for index, row in enumerate(form.rows):

            def remove(*values: Any, index: int = index) -> list[Any]:
                current = form.read(values[:-1])
                del current.models[index : index + 1]
                return [*form.write(current), to_yaml(current, values[-1])]

            row.remove.click(remove, [*form.inputs, recipe], [*form.outputs, recipe])

        # --- validate, merge, follow the job -----------------------------------------------

        def request_of(
            text: str, target_name: str, is_private: bool, follows: bool, identity: Identity
        ) -> MergeRequest:
            return MergeRequest(
                service.read_recipe(text),
                target_name.strip(),
                identity.name,
                "form",
                is_private,
                follows,
            )

        def errors_for(error: MergeError, text: str, on: str) -> tuple[list[str], str]:
            """The error boxes' texts (the error in one: next to the field it names, on the
            tab the person is ``on``) and where to look, for the line under the buttons."""
            field = getattr(error, "field", None)
            repos = [row.repo for row in from_recipe(_safe_load(text)).models]
            place = error_place(field, str(error), repos)
            message = _say(str(error))
            if place == "target":
                box = "target"
            elif on == "yaml":
                box = "recipe"
                line = field_line(text, field) if field else None
                message = f"line {line}: {message}" if line else message
            else:
                box = "form" if place == "recipe" else place
            return [f"⚠ {message}" if p == box else "" for p in PLACES], _where(box)

        def check(
            text: str,
            target_name: str,
            is_private: bool,
            follows: bool,
            on: str,
            token: gr.OAuthToken | None,
        ) -> list[str]:
            try:
                identity = _identity(service, token)
                plan, _ = service.check(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                boxes, where = errors_for(error, text, on)
                return [*boxes, f"Not valid: see the ⚠ {where}."]
            pinned = ", ".join(
                f"{r.path}@{s.revision[:8]}" for r, s in plan.sources.items() if s.revision
            )
            message = f"✓ valid: {plan.method.name}, {len(plan.tasks)} tensors, {plan.output_bytes / 1e6:.1f} MB; sources {pinned}"
            return [*([""] * len(PLACES)), message]

        def submit(
            text: str,
            target_name: str,
            is_private: bool,
            follows: bool,
            on: str,
            token: gr.OAuthToken | None,
        ) -> list[Any]:
            try:
                identity = _identity(service, token)
                job = service.submit(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                boxes, where = errors_for(error, text, on)
                return [*boxes, f"Not submitted: see the ⚠ {where}.", gr.skip()]
            return [*([""] * len(PLACES)), _job_sentence(job), job.id]

        fields = [recipe, target, private, follow, tab]
        validate.click(check, fields, [*errors, outcome])
        merge.click(submit, fields, [*errors, outcome, job_id])

        def poll(current: str, said: str, profile: gr.OAuthProfile | None) -> list[Any]:
            name = profile.username if profile else None
            recent = service.list(limit=50)
            shown = _visible_job(service, current, profile)
            own = service.list(requester=name, limit=20) if name else []
            return [
                *_job_panel(shown),
                _followed(shown, said),
                _job_rows(own),
                _job_rows([j for j in recent if not j.private][:20]),
            ]

        gr.Timer(POLL_SECONDS).tick(
            poll,
            [job_id, outcome],
            [job_status, job_log, job_link, job_card, outcome, mine, public],
        )

        def cancel_job(current: str, token: gr.OAuthToken | None) -> str:
            return _stop(service, current, token)

        cancel.click(cancel_job, job_id, outcome)

        def toggle_following(current: str, token: gr.OAuthToken | None) -> str:
            job = service.get(current.strip()) if current else None
            follow = service.follows.get(job.target) if job else None
            if follow is None:
                return "⚠ this job's result does not follow its sources."
            try:
                return service.set_following(
                    follow.target, _identity(service, token), not follow.active
                )
            except MergeError as error:
                return f"⚠ {_say(str(error))}"

        following.click(toggle_following, job_id, outcome)

        def pick(event: gr.SelectData) -> list[Any]:
            """Open the job of the row clicked: a merge in New merge, a search in Search."""
            if not event.row_value:
                return [gr.skip()] * 3
            picked, kind = event.row_value[0], event.row_value[1]
            if kind == "search":
                return [gr.skip(), picked, gr.Tabs(selected="search")]
            return [picked, gr.skip(), gr.Tabs(selected="new")]

        mine.select(pick, None, [job_id, search_job_id, tabs])
        public.select(pick, None, [job_id, search_job_id, tabs])
        job_id.change(_remember, job_id, last_job)

        def on_load(last: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
            start = example_forms[FIRST_EXAMPLE]
            greeting, namespace = _greeting(settings.bot_namespace, profile)
            return [
                greeting,
                f"{namespace}/merged-model" if namespace else "",
                FIRST_EXAMPLE,
                *form.write(start),
                to_yaml(start),
                last or _latest(service, profile, "merge"),
            ]

        blocks.load(on_load, last_job, [who, target, example, *form.outputs, recipe, job_id])
    return blocks


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One sentence for a YAML error: where, and what (``but got '<stream end>'``)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {problem}"


def _safe_load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None
