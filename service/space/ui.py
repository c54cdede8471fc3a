"""The Space's Gradio Blocks: the New merge and Jobs tabs here, the Search tab in
:mod:`service.space.search_tab`. Thin on purpose: values move between the widgets and
:mod:`service.space.recipe_form`; validating and merging go through
:class:`service.intake.jobs.JobService`, the same path as every other origin; the job panel
(:mod:`service.space.job_panel`) reads the job shown when it changes and then with a
``gr.Timer`` until the job ends; the Jobs tab's tables have a timer of their own. A job opened
there comes back to the form as a copy of its recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import gradio as gr

from merge_engine.errors import MergeError, RecipeError
from merge_engine.methods import all_methods, get_method
from merge_engine.methods.registry import Param
from merge_engine.plan.kinds import output_parts
from merge_engine.recipe import quote
from merge_engine.recipe.hub_names import is_loopback
from merge_engine.recipe.limits import load_yaml
from service.intake.jobs import JobService
from service.intake.request import Identity, MergeRequest
from service.space.job_panel import (
    POLL_SECONDS,
    copy_notice,
    copy_stem,
    greeting_for,
    identity_of,
    job_panel,
    job_sentence,
    latest_job_id,
    own_jobs_hint,
    polls_while,
    proposed_target,
    remember,
    stop_job,
    updated_sentence,
    visible_job,
)
from service.space.recipe_form import (
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
    block_field,
    error_place,
    examples,
    field_line,
    from_recipe,
    layout_reference,
    method_params,
    param_help,
    previous_document,
    row_param_help,
    shows_layers,
    switch_method,
    to_yaml,
)
from service.space.search_tab import build_search_tab
from service.workflows.job_store import Job

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
    adapter: gr.Textbox
    """A LoRA adapter applied to the model before merging (``ModelRow.adapter``)."""
    layers: gr.Textbox
    params: dict[str, gr.components.Component]
    remove: gr.Button
    blocks: gr.Textbox
    """One value per UNet block (diffusion models only)."""
    set_aside: gr.State
    """The per-model values the method shown lacks (``ModelRow.set_aside``)."""


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
        # the models' family (sd1, sdxl, transformers ...), found by inspecting the first
        # model when its field loses focus: which fields a row shows
        self.family = gr.State("")
        self.set_aside = gr.State({})  # global values the method shown lacks
        # the method whose fields show: what a change of method changes from (a State, kept
        # here with the fields, since the dropdown may tell of one change twice)
        self.fields_of = gr.State("")
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
                    adapter = gr.Textbox(
                        label="LoRA adapter",
                        info="applied to this model before merging: a PEFT adapter of it",
                        placeholder="optional: org/name or org/name@revision",
                        elem_id=f"model-{i}-adapter",
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
                # one comma-separated row, as supermerger and the WebUI take block weights
                # (and as they are pasted from presets); the block names head it
                blocks = gr.Textbox(
                    label="weight per block",
                    placeholder="empty: one value for every block",
                    elem_id=f"model-{i}-blocks",
                    visible=False,
                )
                self.errors[f"model-{i}"] = gr.Markdown(elem_id=f"error-model-{i}")
                # last, so that nothing comes between a model's fields and its block row
                with gr.Row():
                    remove = gr.Button(
                        f"Remove model {i + 1}", size="sm", scale=0, elem_id=f"model-{i}-remove"
                    )
            self.rows.append(
                Row(box, repo, revision, adapter, layers, params, remove, blocks, gr.State({}))
            )
        self.add = gr.Button("Add model", size="sm", elem_id="add-model")
        self.errors["models"] = gr.Markdown(elem_id="error-models")
        self.dtype = gr.Dropdown(DTYPES, value="", label="dtype (computation)", elem_id="dtype")
        self.errors["dtype"] = gr.Markdown(elem_id="error-dtype")
        self.notice = gr.Markdown(elem_id="form-notice")

    # --- values in, values out ------------------------------------------------------------

    @property
    def inputs(self) -> list[gr.components.Component]:
        widgets = [self.method, *self.params.values(), self.base_model, self.dtype, self.shown]
        widgets += [self.family, self.set_aside]
        for row in self.rows:
            widgets += [row.repo, row.revision, row.adapter, row.layers, *row.params.values()]
            widgets += [row.blocks, row.set_aside]
        return widgets

    def read(self, values: list[Any]) -> MergeForm:
        values = list(values)
        method = values.pop(0)
        params = {name: values.pop(0) for name in self.params}
        base, dtype, shown = values.pop(0), values.pop(0), values.pop(0)
        family, set_aside = values.pop(0), values.pop(0)
        rows = []
        for _ in self.rows:
            repo, revision, adapter = values.pop(0), values.pop(0), values.pop(0)
            layers = values.pop(0)
            row_params = {name: values.pop(0) for name in PER_MODEL_PARAMS}
            blocks, row_aside = values.pop(0), values.pop(0)
            rows.append(
                ModelRow(
                    repo or "",
                    revision or "",
                    layers or "",
                    row_params,
                    blocks or "",
                    row_aside,
                    adapter=adapter or "",
                )
            )
        rows = rows[:shown]
        return MergeForm(
            method or "",
            params,
            rows,
            base or "",
            dtype or "",
            family=family or "",
            set_aside=set_aside or {},
        )

    @property
    def outputs(self) -> list[gr.components.Component]:
        widgets = [self.method, self.method_doc, *self.params.values(), self.base_model]
        widgets += [self.dtype, self.shown, self.notice, self.family, self.set_aside]
        widgets.append(self.fields_of)
        for row in self.rows:
            widgets += [row.box, row.repo, row.revision, row.adapter, row.layers]
            widgets += list(row.params.values())
            widgets += [row.blocks, row.set_aside]
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
        updates += [form.base_model, form.dtype, shown, form.notice, form.family, form.set_aside]
        updates.append(form.method)
        for i, _ in enumerate(self.rows):
            row = form.models[i] if i < len(form.models) else ModelRow()
            updates += [gr.update(visible=i < shown), row.repo, row.revision, row.adapter]
            updates.append(gr.update(value=row.layers, visible=shows_layers(form, row)))
            help_of = partial(row_param_help, form, row)
            updates += [
                _shown(per_model.get(name), row.params.get(name), help_of)
                for name in PER_MODEL_PARAMS
            ]
            updates += [_block_update(form, row, value=row.blocks), row.set_aside]
        return updates

    @property
    def edits(self) -> list[tuple[gr.components.Component, list[str]]]:
        """The fields a person types in or picks (the method aside), each with the error
        boxes about it: emptied when it changes, until Validate says again."""
        fields = [(widget, ["parameters"]) for widget in self.params.values()]
        fields += [(self.base_model, ["base_model"]), (self.dtype, ["dtype"])]
        for i, row in enumerate(self.rows):
            # which models are listed: also what the list's own errors are about
            fields += [
                (widget, [f"model-{i}", "models"])
                for widget in (row.repo, row.revision, row.adapter)
            ]
            fields += [
                (widget, [f"model-{i}"])
                for widget in (row.layers, *row.params.values(), row.blocks)
            ]
        return fields

    @property
    def layout_outputs(self) -> list[gr.components.Component]:
        """What the models' family changes: each row's layer range, block field, and the help
        of the parameter a block row replaces."""
        return [
            widget for row in self.rows for widget in (row.layers, row.blocks, *row.params.values())
        ]

    def write_layout(self, form: MergeForm) -> list[Any]:
        """Updates for ``layout_outputs``: which fields show for ``form``'s family, the
        block names heading each block field, and the parameters' help; values untouched
        (the person may be typing)."""
        per_model = method_params(form.method, "per_model")
        updates: list[Any] = []
        for i, _ in enumerate(self.rows):
            row = form.models[i] if i < len(form.models) else ModelRow()
            updates += [gr.update(visible=shows_layers(form, row)), _block_update(form, row)]
            updates += [
                gr.update(info=row_param_help(form, row, per_model[name]))
                if name in per_model
                else gr.skip()
                for name in PER_MODEL_PARAMS
            ]
        return updates


def _block_update(form: MergeForm, row: ModelRow, **value: Any) -> Any:
    """The update of a row's block field: shown for diffusion models, headed by the block
    names of their family."""
    shown = block_field(form, row)
    if not shown.visible:
        return gr.update(visible=False, **value)
    return gr.update(visible=True, label=shown.label, info=shown.info, **value)


def _shown(param: Param | None, value: Any, help_of: Callable[[Param], str] = param_help) -> Any:
    """The update of a parameter's field: hidden when the method lacks it, else with the
    method's own help text (``help_of`` it)."""
    if param is None:
        return gr.update(value=value, visible=False)
    return gr.update(value=value, visible=True, info=help_of(param))


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


SHOW_PANEL = """() => {
  const show = (frames) => {
    const panel = [...document.querySelectorAll('#job-id, #search-job-id')]
      .find((element) => element.offsetParent !== null);
    if (panel) panel.scrollIntoView({block: 'start'});
    else if (frames > 0) requestAnimationFrame(() => show(frames - 1));
  };
  show(120);
}"""
"""Bring the panel of the job just opened into view (the tab it is on has just been selected,
and may not be drawn yet): its id at the top of the window, its status under it."""


def _job_rows(jobs: list[Job]) -> list[list[Any]]:
    return [[j.id, j.kind, j.status, j.stage, f"{j.progress:.0%}", j.target] for j in jobs]


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


SEE_ERROR = "see the ⚠"
"""How the line under the buttons points at the error box that says why."""


def _cleared(said: Sequence[str], line: str) -> list[Any]:
    """Updates that empty the error boxes that ``said`` something, the fields they were about
    having changed, and then the line under the buttons (``line``) if it pointed at one."""
    stale = any(said) and SEE_ERROR in (line or "")
    return [*("" if text else gr.skip() for text in said), "" if stale else gr.skip()]


def _where(box: str) -> str:
    if box.startswith("model-"):
        return f"under model {int(box.split('-')[1]) + 1}"
    return WHERE[box]


def build_blocks(service: JobService) -> gr.Blocks:
    settings = service.settings
    limits = settings.recipe_limits  # what the YAML box is read within, as a recipe is
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
                # whose recipe the form holds, when it is a copy of a job opened in Jobs
                copied = gr.Markdown(elem_id="copied-from")
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
                mine_hint = gr.Markdown(elem_id="my-jobs-hint")
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

        def edit(event: Any, handler: Callable, inputs: list, outputs: list, places: list[str]):
            """Listen to ``event`` with ``handler``, which also empties the error boxes of
            ``places`` (those about what the person changed) and the line under the buttons
            when it pointed at one of them."""
            boxes = [form.errors[place] for place in places]

            def run(*values: Any) -> list[Any]:
                said, line = values[len(inputs) : -1], values[-1]
                return [*handler(*values[: len(inputs)]), *_cleared(said, line)]

            return event(run, [*inputs, *boxes, outcome], [*outputs, *boxes, outcome])

        def form_to_yaml(*values: Any) -> list[str]:
            return [to_yaml(form.read(values[:-1]), values[-1])]

        # a YAML edit rewrites the form: every error but the target's is stale; the YAML's
        # own box shows what the live check finds
        rewritten = [place for place in PLACES if place != "target"]

        def yaml_to_form(text: str, family: str, *said: str) -> list[Any]:
            *boxes, line = _cleared(said[:-1], said[-1])
            try:
                data = load_yaml(text, limits)
            except RecipeError as error:
                updates = [gr.skip()] * len(form.outputs)
                boxes[rewritten.index("recipe")] = f"⚠ {quote.text(str(error))}"
            else:
                updates = form.write(replace(from_recipe(data), family=family))
                boxes[rewritten.index("recipe")] = ""
            return [*updates, *boxes, line]

        def method_changed(*values: Any) -> list[Any]:
            *fields, before, text = values
            current = form.read(fields)
            if current.method == before:  # told again: the fields are this method's already
                return [gr.skip()] * (len(form.outputs) + 1)
            current = switch_method(current, before)
            return [*form.write(current), to_yaml(current, text)]

        def show_example(name: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
            chosen = example_forms.get(name or "", MergeForm())
            # a fresh start: no error, outcome or job of what was there before
            return [
                *form.write(chosen),
                to_yaml(chosen),
                proposed_target(service, f"{chosen.method}-merge", profile),
                *([""] * len(PLACES)),
                "",
                "",
                "",
            ]

        def add_model(*values: Any) -> list[Any]:
            current = form.read(values[:-1])
            current.models.append(ModelRow())
            return [*form.write(current), to_yaml(current, values[-1])]

        with_yaml = [*form.inputs, recipe]
        for widget, places in form.edits:
            edit(widget.input, form_to_yaml, with_yaml, [recipe], places)
        # another method changes what every field means
        edit(
            form.method.input,
            method_changed,
            [*form.inputs, form.fields_of, recipe],
            [*form.outputs, recipe],
            rewritten,
        )
        rewritten_boxes = [form.errors[place] for place in rewritten]
        recipe.input(
            yaml_to_form,
            [recipe, form.family, *rewritten_boxes, outcome],
            [*form.outputs, *rewritten_boxes, outcome],
        )
        edit(target.input, lambda: [], [], [], ["target"])  # nothing to do but empty its box
        shown_example = load_example.click(
            show_example,
            example,
            [*form.outputs, recipe, target, *errors, outcome, job_id, copied],
        )
        edit(form.add.click, add_model, with_yaml, [*form.outputs, recipe], ["models"])
        # the rows below a removed one move up: their errors no longer sit by their model
        rows_and_list = [place for place in PLACES if place.startswith("model")]
        removals = []
        for index, row in enumerate(form.rows):

            def remove(*values: Any, index: int = index) -> list[Any]:
                current = form.read(values[:-1])
                del current.models[index : index + 1]
                return [*form.write(current), to_yaml(current, values[-1])]

            removals.append(
                edit(row.remove.click, remove, with_yaml, [*form.outputs, recipe], rows_and_list)
            )

        # --- which kind of models: the first one's layout, read with the person's token ----

        first = form.rows[0]

        def find_family(repo: str, revision: str, base: str, token: gr.OAuthToken | None) -> str:
            """The family of the form's first model (else its base), or "" when unknown."""
            reference = layout_reference(repo, revision, base)
            if reference is None:
                return ""
            layout = service.model_layout(reference, identity_of(service, token))
            return layout.family if layout else ""

        def family_changed(*values: Any) -> list[Any]:
            return form.write_layout(form.read(values))

        probe = {
            "fn": find_family,
            "inputs": [first.repo, first.revision, form.base_model],
            "outputs": form.family,
        }
        for widget in (first.repo, first.revision, form.base_model, recipe):
            widget.blur(**probe)
        for event in (shown_example, *removals):
            event.then(**probe)
        # a change of family (a State: only when it differs) shows or hides the block fields
        form.family.change(family_changed, form.inputs, form.layout_outputs)

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
            repos = [row.repo for row in from_recipe(previous_document(text, limits)).models]
            place = error_place(field, str(error), repos)
            message = quote.text(str(error))
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
                identity = identity_of(service, token)
                plan, _ = service.check(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                boxes, where = errors_for(error, text, on)
                return [*boxes, f"Not valid: {SEE_ERROR} {where}."]
            pinned = ", ".join(f"{ref.path}@{sha[:8]}" for ref, sha in plan.revisions().items())
            message = f"✓ valid: {plan.recipe.merge_method}, {output_parts(plan)}, {plan.output_bytes / 1e6:.1f} MB; sources {pinned}"
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
                identity = identity_of(service, token)
                job = service.submit(
                    request_of(text, target_name, is_private, follows, identity), identity
                )
            except MergeError as error:
                boxes, where = errors_for(error, text, on)
                return [*boxes, f"Not submitted: {SEE_ERROR} {where}.", gr.skip()]
            return [*([""] * len(PLACES)), job_sentence(job), job.id]

        def follow_job(current: str, said: str, profile: gr.OAuthProfile | None) -> list[Any]:
            """The panel of the job shown, and whether to read it again in a second."""
            shown = visible_job(service, current, profile)
            return [
                *job_panel(shown, settings.endpoint),
                updated_sentence(shown, said),
                polls_while(shown),
            ]

        # the panel is read when another job is shown, and then each second until it ends
        panel_timer = gr.Timer(POLL_SECONDS, active=False)
        following_job = {
            "fn": follow_job,
            "inputs": [job_id, outcome],
            "outputs": [job_status, job_log, job_link, job_card, outcome, panel_timer],
            "show_progress": "hidden",
        }
        panel_timer.tick(**following_job)
        job_id.change(**following_job)

        fields = [recipe, target, private, follow, tab]
        validate.click(check, fields, [*errors, outcome]).then(**probe)
        # the same job again (a failed one runs another attempt) keeps its id: follow it anew
        merge.click(submit, fields, [*errors, outcome, job_id]).then(**following_job)

        def list_jobs(profile: gr.OAuthProfile | None) -> list[Any]:
            name = profile.username if profile else None
            own = service.list(requester=name, limit=20) if name else []
            recent = service.list(limit=50)
            return [
                _job_rows(own),
                own_jobs_hint(profile, own),
                _job_rows([j for j in recent if not j.private][:20]),
            ]

        tables = {"fn": list_jobs, "outputs": [mine, mine_hint, public]}
        gr.Timer(POLL_SECONDS).tick(**tables)
        blocks.load(**tables)

        def cancel_job(current: str, token: gr.OAuthToken | None) -> str:
            return stop_job(service, current, token)

        cancel.click(cancel_job, job_id, outcome)

        def toggle_following(current: str, token: gr.OAuthToken | None) -> str:
            job = service.get(current.strip()) if current else None
            follow = service.follows.get(job.target) if job else None
            if follow is None:
                return "⚠ this job's result does not follow its sources."
            try:
                return service.set_following(
                    follow.target, identity_of(service, token), not follow.active
                )
            except MergeError as error:
                return f"⚠ {quote.text(str(error))}"

        following.click(toggle_following, job_id, outcome)

        copy_outputs = [*form.outputs, recipe, target, private, follow, copied, *errors, outcome]

        def pick(event: gr.SelectData, profile: gr.OAuthProfile | None) -> list[Any]:
            """Open the job of the row clicked: a search in Search; a merge in New merge, its
            recipe in the form as a copy to run again, into a target no job has yet."""
            unchanged = [gr.skip()] * len(copy_outputs)
            if not event.row_value:
                return [gr.skip()] * 3 + unchanged
            picked, kind = event.row_value[0], event.row_value[1]
            if kind == "search":
                return [gr.skip(), picked, gr.Tabs(selected="search"), *unchanged]
            opened = [picked, gr.skip(), gr.Tabs(selected="new")]
            job = visible_job(service, picked, profile)
            if job is None:
                return opened + unchanged
            text = job.request_recipe or job.recipe  # as asked: its sources not pinned
            try:
                copy = from_recipe(load_yaml(text, limits))
            except RecipeError:  # a recipe stored under wider limits than today's
                return opened + unchanged
            return [
                *opened,
                *form.write(copy),
                text,
                proposed_target(service, copy_stem(job.target), profile),
                job.private,
                job.follow_sources,
                copy_notice(job),
                *([""] * len(PLACES)),
                job_sentence(job),
            ]

        for table in (mine, public):
            table.select(pick, None, [job_id, search_job_id, tabs, *copy_outputs]).then(
                None, js=SHOW_PANEL
            ).then(**probe)
        job_id.change(remember, job_id, last_job)

        def on_load(last: str | None, profile: gr.OAuthProfile | None) -> list[Any]:
            start = example_forms[FIRST_EXAMPLE]
            greeting, _ = greeting_for(settings.bot_namespace, profile)
            return [
                greeting,
                proposed_target(service, f"{start.method}-merge", profile),
                FIRST_EXAMPLE,
                *form.write(start),
                to_yaml(start),
                last or latest_job_id(service, profile, "merge"),
            ]

        blocks.load(on_load, last_job, [who, target, example, *form.outputs, recipe, job_id])
    return blocks
