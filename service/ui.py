"""The Space's Gradio Blocks. Thin on purpose: values move between the widgets and
:mod:`service.recipe_form`; validating and merging go through :class:`service.jobs.JobService`,
the same path as every other origin; the job panel polls the job table with a ``gr.Timer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import yaml

from merge_engine.errors import MergeError, RecipeError
from merge_engine.methods import all_methods, get_method
from service.intake import Identity, MergeRequest
from service.job_store import ACTIVE, Job
from service.jobs import JobService
from service.recipe_form import (
    DTYPES,
    EXAMPLES,
    GLOBAL_PARAMS,
    MAX_MODELS,
    PER_MODEL_PARAMS,
    MergeForm,
    ModelRow,
    error_place,
    from_recipe,
    method_params,
    to_yaml,
)

PLACES = ("method", "parameters", "base_model", "models", "dtype", "target", "recipe")
POLL_SECONDS = 1.0
JOB_COLUMNS = ["job", "status", "stage", "progress", "target"]


def _param_widget(param, elem: str) -> gr.components.Component:
    """A field for a registry parameter: its type, help text and bounds; shown per method."""
    label = param.name
    info = " ".join(filter(None, [param.doc, param.bounds_text()]))
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
            with gr.Group(visible=i < 2) as box, gr.Row():
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
                    label="layers", placeholder="all, or 0-16", elem_id=f"model-{i}-layers"
                )
                params = {
                    name: _param_widget(param, f"model-{i}-{name}")
                    for name, param in PER_MODEL_PARAMS.items()
                }
                remove = gr.Button("Remove", size="sm", elem_id=f"model-{i}-remove")
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
            updates.append(gr.update(value=value, visible=param is not None))
        updates += [form.base_model, form.dtype, shown, form.notice]
        for i, _ in enumerate(self.rows):
            row = form.models[i] if i < len(form.models) else ModelRow()
            updates += [gr.update(visible=i < shown), row.repo, row.revision, row.layers]
            updates += [
                gr.update(value=row.params.get(name), visible=name in per_model)
                for name in PER_MODEL_PARAMS
            ]
        return updates


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
    return [[j.id, j.status, j.stage, f"{j.progress:.0%}", j.target] for j in jobs]


def _job_panel(job: Job | None) -> tuple[str, str, str, str]:
    if job is None:
        return "", "", "", ""
    bar = f"{job.progress:.0%}"
    status = f"**{job.status}** · stage **{job.stage}** · {bar}"
    if job.error:
        status += f"\n\n{job.error}"
    link = f"[{job.target}]({job.url})" if job.url else ""
    return status, "\n".join(job.log), link, job.card or ""


def build_blocks(service: JobService) -> gr.Blocks:
    settings = service.settings
    with gr.Blocks(title="mergebot") as blocks:
        gr.Markdown(
            "# mergebot\nMerge fine-tuned models into one, without training data: pick a method, "
            "list the models, validate in seconds, merge, and get a repo with a model card."
        )
        with gr.Row():
            gr.LoginButton()
            who = gr.Markdown(elem_id="who")
        with gr.Tab("New merge"):
            with gr.Row():
                example = gr.Dropdown(list(EXAMPLES), label="Examples", elem_id="example")
                load_example = gr.Button("Load example", elem_id="load-example")
            with gr.Tab("Form"):
                form = MergeFormWidgets()
            with gr.Tab("YAML", elem_id="yaml-tab"):
                recipe = gr.Textbox(label="Recipe (YAML)", lines=18, elem_id="recipe-yaml")
                form.errors["recipe"] = gr.Markdown(elem_id="error-recipe")
            target = gr.Textbox(label="Target repo", placeholder="namespace/name", elem_id="target")
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
            job_status = gr.Markdown(elem_id="job-status")
            job_link = gr.Markdown(elem_id="job-link")
            job_log = gr.Textbox(label="Log", lines=8, elem_id="job-log")
            with gr.Row():
                cancel = gr.Button("Cancel job", elem_id="cancel")
                following = gr.Button("Stop / restart following the sources", elem_id="following")
            with gr.Accordion("Model card", open=False):
                job_card = gr.Markdown(elem_id="job-card")
        with gr.Tab("Jobs"):
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

        # --- the form and the YAML, each writing the other --------------------------------

        def form_to_yaml(*values: Any) -> str:
            return to_yaml(form.read(values[:-1]), values[-1])

        def yaml_to_form(text: str) -> list[Any]:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                return [gr.skip()] * len(form.outputs) + [
                    f"⚠ not valid YAML: {error.__class__.__name__}"
                ]
            return [*form.write(from_recipe(data)), ""]

        def method_changed(*values: Any) -> list[Any]:
            current = form.read(values[:-1])
            return [*form.write(current), to_yaml(current, values[-1])]

        def show_example(name: str | None) -> list[Any]:
            chosen = EXAMPLES.get(name or "", MergeForm())
            return [*form.write(chosen), to_yaml(chosen)]

        def add_model(*values: Any) -> list[Any]:
            current = form.read(values[:-1])
            current.models.append(ModelRow())
            return [*form.write(current), to_yaml(current, values[-1])]

        for widget in form.inputs:
            if widget is not form.method and not isinstance(widget, gr.State):
                widget.input(form_to_yaml, [*form.inputs, recipe], recipe)
        form.method.input(method_changed, [*form.inputs, recipe], [*form.outputs, recipe])
        recipe.input(yaml_to_form, recipe, [*form.outputs, form.errors["recipe"]])
        load_example.click(show_example, example, [*form.outputs, recipe])
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

        def errors_for(error: MergeError, text: str) -> list[str]:
            field = error.field if isinstance(error, RecipeError) else None
            repos = [row.repo for row in from_recipe(_safe_load(text)).models]
            place = error_place(field, str(error), repos)
            return [f"⚠ {error}" if p == place else "" for p in PLACES]

        def check(
            text: str,
            target_name: str,
            is_private: bool,
            follows: bool,
            token: gr.OAuthToken | None,
        ) -> list[str]:
            try:
                identity = _identity(service, token)
                plan, _ = service.check(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                return [*errors_for(error, text), "Not valid: fix the field marked ⚠."]
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
            token: gr.OAuthToken | None,
        ) -> list[Any]:
            try:
                identity = _identity(service, token)
                job = service.submit(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                return [
                    *errors_for(error, text),
                    "Not submitted: fix the field marked ⚠.",
                    gr.skip(),
                ]
            return [*([""] * len(PLACES)), f"Job {job.id} is {job.status}.", job.id]

        fields = [recipe, target, private, follow]
        validate.click(check, fields, [*errors, outcome])
        merge.click(submit, fields, [*errors, outcome, job_id])

        def poll(current: str, profile: gr.OAuthProfile | None) -> list[Any]:
            name = profile.username if profile else None
            recent = service.list(limit=50)
            shown = service.get(current.strip()) if current and current.strip() else None
            if shown and shown.private and (name is None or shown.requester != name):
                shown = None  # a private job's card and log are its signed-in requester's only
            own = service.list(requester=name, limit=20) if name else []
            return [
                *_job_panel(shown),
                _job_rows(own),
                _job_rows([j for j in recent if not j.private][:20]),
            ]

        gr.Timer(POLL_SECONDS).tick(
            poll, job_id, [job_status, job_log, job_link, job_card, mine, public]
        )

        def cancel_job(current: str, token: gr.OAuthToken | None) -> str:
            try:
                job = service.cancel(current.strip(), _identity(service, token))
            except MergeError as error:
                return f"⚠ {error}"
            return f"Job {job.id}: {'cancel requested' if job.status in ACTIVE else job.status}."

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
                return f"⚠ {error}"

        following.click(toggle_following, job_id, outcome)

        def pick(event: gr.SelectData) -> str:
            return event.row_value[0] if event.row_value else gr.skip()

        mine.select(pick, None, job_id)
        public.select(pick, None, job_id)

        def on_load(profile: gr.OAuthProfile | None) -> list[Any]:
            start = EXAMPLES["TIES of three"]
            if profile:
                namespace = profile.username
                greeting = (
                    f"Signed in as **{namespace}**: results go to your namespace, with your token."
                )
            elif settings.bot_namespace:
                namespace = settings.bot_namespace
                greeting = f"Not signed in: results go to **{namespace}/…**, one job at a time for everyone not signed in."
            else:
                namespace = ""
                greeting = (
                    "Sign in with Hugging Face to merge: this bot has no namespace of its own."
                )
            return [
                greeting,
                f"{namespace}/merged-model" if namespace else "",
                *form.write(start),
                to_yaml(start),
            ]

        blocks.load(on_load, None, [who, target, *form.outputs, recipe])
    return blocks


def _safe_load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None
