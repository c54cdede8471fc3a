"""The Space's Search tab: the spec's form and YAML (values move through
:mod:`service.space.search_form`), Validate and Start through
:class:`service.intake.jobs.JobService` like every other origin, and the live panel of a running
search, read through the service's one-second cache of search status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from merge_engine.errors import MergeError, RecipeError
from merge_engine.evolve.report import fitness_figure
from merge_engine.evolve.spec import BUILT_IN_KINDS, SPACES
from merge_engine.recipe import quote
from merge_engine.recipe.hub_names import is_loopback
from merge_engine.recipe.limits import load_yaml
from service.intake.jobs import JobService
from service.intake.request import Identity, SearchRequest
from service.space.job_panel import (
    POLL_SECONDS,
    card_shown,
    identity_of,
    job_sentence,
    job_status_html,
    latest_job_id,
    may_see,
    polls_while,
    proposed_target,
    remember,
    result_link,
    stop_job,
    updated_sentence,
)
from service.space.recipe_form import (
    DEMO_MODELS,
    HUB_MODELS,
    field_line,
)
from service.space.search_form import (
    EXAMPLES_HELP,
    FIRST_SEARCH,
    MAX_SEARCHED,
    MAX_TASKS,
    SEARCH_METHODS,
    SEARCHABLE,
    SearchedParam,
    SearchForm,
    TaskRow,
    from_spec,
    genes_yaml,
    plotted,
    progress_html,
    search_examples,
    valid_sentence,
)
from service.space.search_form import to_yaml as spec_yaml
from service.workflows.job_store import Job

INTRO = (
    "Search a merge instead of guessing it: an evolutionary search (CMA-ES) tries merges "
    "of the sources, scores each on your fitness tasks, and publishes the best with a card "
    "that compares it with every source."
)
HOW_A_SEARCH_WORKS = """\
- **What is searched** (*Space*). `parameters`: the method's per-model numbers (weight,
  density, ...) within the bounds you give, one value per model and layer group. `layers`: a
  layer path, which layer of which model runs in each slot, with a scale on each layer's input
  (unless `scaling: false`). `both`: parameters first, then a layer path over the sources and
  that merge.
- **A trial** merges one candidate in memory and scores it on the fitness tasks. `nll`: texts,
  fitness is minus the mean negative log-likelihood per token; `exact_match`: prompt and
  answer, greedy generation; `multiple_choice`: prompt, choices and answer; `classification`:
  text and label. The fitness is the weighted mean over the tasks: higher is better.
- **Two splits.** Each task's examples are split into search examples and held-out ones (a
  quarter, unless the YAML gives `held_out` data). The winner is the best candidate on the
  search split; the held-out split plays no part in choosing it and shows in the card.
- **Baselines.** Before the first trial every source (and, with two or more, their uniform
  merge) is scored: the dashed lines of the plot and the rows of the card's table.
- **Budget.** `trials` per stage; `population`, the candidates CMA-ES proposes per
  generation; `wall time`, the time the search may run on a worker (time waiting for its
  turn while other searches run does not count). When the trials or the wall time are
  spent, or on *Stop and publish the best so far*, the best candidate so far is written.
- **The result**: the winner, checked to load and to score on the held-out split what its
  card says, pushed in one commit with the card (fitness table, plot, spec and recipe).
- **The YAML tab** takes the whole spec, with what the form does not show: the layer
  genome (`layers`: `repeats`, `max_length`, `scaling`), the parameter genome's `fixed`,
  `layers_per_value` and `filters`, a task's `held_out` data and field names (`prompt_field`,
  ...), and the `seed`."""
"""The spec's essentials, in the tab: a Space's visitor has no copy of ``docs/evolve.md``."""


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
    if view is None or not may_see(view.job, profile):
        return None, {}
    return view.job, view.data


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
                    list(BUILT_IN_KINDS),
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
    gr.Markdown(INTRO)
    with gr.Accordion("How a search works", open=False, elem_id="search-how"):
        gr.Markdown(HOW_A_SEARCH_WORKS)
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
            data = load_yaml(text, service.settings.recipe_limits)
        except RecipeError as error:
            return [gr.skip()] * len(form.outputs) + [f"⚠ {quote.text(str(error))}"]
        return [*form.write(from_spec(data)), ""]

    def show_example(name: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
        chosen = example_forms.get(name or "", SearchForm())
        target_name = proposed_target(service, search_stem(chosen), profile)
        return [*form.write(chosen), spec_yaml(chosen), target_name, "", "", ""]

    def add_task(*values: Any) -> list[Any]:
        current = form.read(values[:-1])
        current.tasks.append(TaskRow())
        return [*form.write(current), spec_yaml(current, values[-1])]

    for widget in form.inputs:
        if not isinstance(widget, gr.State):
            widget.input(form_to_yaml, [*form.inputs, spec], spec)
    spec.input(yaml_to_form, spec, [*form.outputs, yaml_error])
    load_example.click(
        show_example, example, [*form.outputs, spec, target, yaml_error, outcome, job_id]
    )
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
            identity = identity_of(service, token)
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
            identity = identity_of(service, token)
            job = service.submit_search(
                request_of(text, target_name, is_private, identity), identity
            )
        except MergeError as error:
            return [f"⚠ Not started: {_spec_error(error, text)}", gr.skip()]
        service.searches.forget(job.id)  # a search that ran before under this id starts anew
        return [job_sentence(job), job.id]

    validate.click(check, [spec, target, private], outcome)
    started = start.click(submit, [spec, target, private], [outcome, job_id])

    def poll(current: str, said: str, before: str, profile: gr.OAuthProfile | None) -> list[Any]:
        job, status = _search_view(service, current, profile)
        if job is None:
            shown = [gr.skip()] * 8 if not before else ["", None, "", "", "", "", gr.skip(), ""]
            return [*shown, polls_while(None)]
        panel, plot_value, genes, now = _search_panel(job, status, before)
        log_text = "\n".join(job.log)
        return [
            panel,
            plot_value,
            genes,
            result_link(job, service.settings.endpoint),
            card_shown(job),
            log_text,
            updated_sentence(job, said),
            now,
            polls_while(job),
        ]

    # as the merge's panel: read when another search is shown, then each second until it ends
    timer = gr.Timer(POLL_SECONDS, active=False)
    following = {
        "fn": poll,
        "inputs": [job_id, outcome, drawn],
        "outputs": [status, plot, best, link, card, log, outcome, drawn, timer],
        "show_progress": "hidden",
    }
    timer.tick(**following)
    job_id.change(**following)
    started.then(**following)  # the same search again keeps its id: follow it anew

    def stop_search(current: str, token: gr.OAuthToken | None) -> str:
        return stop_job(service, current, token)

    def publish_best(current: str, token: gr.OAuthToken | None) -> str:
        return stop_job(service, current, token, publish_best=True)

    cancel.click(stop_search, job_id, outcome)
    publish.click(publish_best, job_id, outcome)

    job_id.change(remember, job_id, last)

    def on_load(followed: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
        start_form = example_forms[FIRST_SEARCH]
        return [
            proposed_target(service, search_stem(start_form), profile),
            FIRST_SEARCH,
            *form.write(start_form),
            spec_yaml(start_form),
            followed or latest_job_id(service, profile, "search"),
        ]

    blocks.load(on_load, last, [target, example, *form.outputs, spec, job_id])
    return job_id


def search_stem(form: SearchForm) -> str:
    """The name a search's proposed target starts with: what it searches."""
    return "layer-path-search" if form.space == "layers" else f"{form.method}-search"


def _spec_error(error: MergeError, text: str) -> str:
    """The error's sentence, with the line of the YAML that the field it names is on."""
    field = getattr(error, "field", None)
    line = field_line(text, field) if field else None
    return quote.text(str(error)) + (f" (line {line} of the YAML)" if line else "")


def _search_panel(job: Job, status: dict, drawn: str) -> tuple[str, Any, Any, str]:
    """The status (stage bars, trials done of the budget, best so far, time left), the
    fitness plot (each trial, the best so far, and the sources' fitness once the search has
    scored them, before its first trial) and the best genes of ``job``; the plot and genes are
    drawn again only when that changed since ``drawn``."""
    if job.kind != "search":
        return job_status_html(job), None, "", ""
    now = f"{job.id}.{job.attempt}:{status['done']}:{len(status['baselines'])}"
    panel = progress_html(status) + job_status_html(job)
    if now == drawn:
        return panel, gr.skip(), gr.skip(), now
    trials, sources = plotted(status)
    figure = fitness_figure(trials, sources) if trials or sources else None
    return panel, figure, genes_yaml(status), now
