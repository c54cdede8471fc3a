"""The model card: typed metadata (``ModelCardData``) plus a Jinja template of the prose.

It documents the method and its paper, the parameter values actually used (summarised over
tensors when gradients or filters make them vary), every source with its pinned revision,
the recipe, and the command that reproduces the merge. ``base_model`` lists Hub ids only.
Links to sources go to the Hub they came from (``endpoint``); the install command names where
this very mergebot is published, never a package index name that someone else could claim.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, constants

from merge_engine.plan.merge_plan import MergePlan
from merge_engine.recipe import quote
from merge_engine.recipe.hub_names import is_loopback
from merge_engine.recipe.schema import BlockValues, ModelReference
from merge_engine.sources.formats.blocks import block_names
from merge_engine.sources.formats.layouts import TRANSFORMERS

TEMPLATE = files("merge_engine.output") / "templates" / "card.md"
DEFAULT_COMMAND = "mergebot merge mergebot_recipe.yaml ./merged"
PUBLIC_HUB = "https://huggingface.co"
"""Where Spaces run: a Space's git repository is there even when the bot talks to a local hub."""


def _summary(values: list[Any]) -> str:
    distinct = sorted(set(values), key=str)
    if len(distinct) == 1:
        shown = f"{distinct[0]:g}" if isinstance(distinct[0], float) else distinct[0]
        return quote.code(shown, table=True)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return f"`{min(distinct):g}` to `{max(distinct):g}` (varies by layer or filter)"
    return ", ".join(quote.code(v, table=True) for v in distinct) + " (varies by tensor)"


def parameter_rows(plan: MergePlan) -> list[dict[str, str]]:
    tasks = [t for t in plan.tasks if not t.copy_only]
    rows = []
    for param in plan.method.global_params:
        values = [t.shared[param.name] for t in tasks]
        rows.append(
            {
                "name": param.name,
                "scope": "global",
                "value": _summary(values),
                "default": _default(param),
            }
        )
    for param in plan.method.per_model_params:
        by_model: dict[ModelReference, list[Any]] = {}
        for task in tasks:
            for read, values in zip(task.inputs, task.per_model, strict=True):
                by_model.setdefault(read.model, []).append(values[param.name])
        for model, values in by_model.items():
            rows.append(
                {
                    "name": param.name,
                    "scope": quote.cell(model),
                    "value": _summary(values),
                    "default": _default(param),
                }
            )
    return rows


def block_table(plan: MergePlan) -> dict[str, Any] | None:
    """The recipe's block values as a table: one row per UNet block, one column per setting
    (``weight`` of a model, a global ``t``); None when the recipe gives none."""
    if not plan.layout.is_diffusion:
        return None
    columns, values = [], []
    levels = [("", plan.recipe.parameters)]
    levels += [(f" of {quote.cell(m.model)}", m.parameters) for m in plan.recipe.models or []]
    for whose, parameters in levels:
        for name, setting in (parameters or {}).items():
            if isinstance(setting, BlockValues):
                columns.append(f"{quote.code(name, table=True)}{whose}")
                values.append(setting.blocks)
    if not columns:
        return None
    blocks = block_names(plan.layout.family)
    rows = [[block, *(f"{v[i]:g}" for v in values)] for i, block in enumerate(blocks)]
    return {"columns": columns, "rows": rows}


def _default(param) -> str:
    return "required" if param.required else quote.code(param.default, table=True)


def _hub_link(ref: ModelReference, is_local: bool, endpoint: str) -> str:
    if is_local:
        return f"{quote.code(ref.path, table=True)} ({ref.local_kind()})"
    return f"[{quote.cell(ref.path)}]({endpoint}/{ref.path})"


def _pin(revision: str | None) -> str:
    return f"`{revision}`" if revision else "local"


def mergebot_version() -> str:
    try:
        return version("mergebot")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(version unknown: not installed)"


def install_instructions(endpoint: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """How a reader installs the mergebot that made the card: ``prose`` to read, and the
    ``command`` to run (empty when no published location is known). mergebot is not on PyPI, so
    ``pip install mergebot`` would install whatever someone registered under that name."""
    env = os.environ if env is None else env
    space = env.get("SPACE_ID")
    made_by = f"mergebot {mergebot_version()}"
    if space:
        # The Space's repository is on the Hub that runs it; the sandbox hub of the offline
        # demo (a loopback address) holds no Spaces.
        hub = PUBLIC_HUB if is_loopback(endpoint) else endpoint
        url = f"{hub}/spaces/{space}"
        return {
            "prose": f"This merge was made by {made_by}, running as the Space [{space}]({url}). "
            "mergebot is not published on PyPI; install it from the Space's git repository "
            "(for exactly this version, add `@<commit>` with the Space's commit that was live "
            "when this card was written), then run the merge:",
            "command": f'pip install "git+{url}"',
        }
    return {
        "prose": f"This merge was made by {made_by}. mergebot is not published on PyPI (a "
        "package of that name there is not this project): install this version from the "
        "source you got mergebot from, then run the merge:",
        "command": "",
    }


def tidy(markdown: str) -> str:
    """At most one blank line in a row outside fenced code, and none at either end."""
    lines: list[str] = []
    fence = ""  # the open fence's backticks; a block closes on a line of at least as many
    for line in markdown.strip("\n").split("\n"):
        ticks = line[: len(line) - len(line.lstrip("`"))]
        if not fence and len(ticks) >= 3:
            fence = ticks
        elif fence and len(ticks) >= len(fence) and not line.strip("`").strip():
            fence = ""
        elif not fence and not line.strip():
            if lines and lines[-1] == "":
                continue
            line = ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def _role(plan: MergePlan, ref: ModelReference, read: set[ModelReference]) -> str:
    bases = {plan.recipe.base_model, *(s.base_model for s in plan.recipe.slices or [])}
    if ref in bases and plan.method.base != "unused":
        return "base"
    entries = [e for m in plan.recipe.models or [] for e in m.loras or [] if e.lora == ref]
    if entries:
        strengths = ", ".join(
            f"{e.strength:g}" + (" by block" if e.blocks else "") for e in entries
        )
        return f"LoRA, strength {strengths}"
    if ref in read:
        return "input"
    return "config donor" if ref == plan.recipe.donor() else "tokenizer"


def build_card(
    plan: MergePlan,
    name: str | None = None,
    command: str | None = None,
    job_id: str | None = None,
    credit: str | None = None,
    changes: list[str] | None = None,
    endpoint: str | None = None,
    section: str | None = None,
) -> ModelCard:
    """The card of a merge; ``job_id`` names the service job that produced it, ``credit`` who
    asked for it, ``changes`` what moved since the last merge of a followed recipe,
    ``endpoint`` the Hub the sources came from (``HF_ENDPOINT`` when not given), ``section``
    markdown of how the recipe was found (an evolutionary search), placed before the sources."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    install = install_instructions(endpoint)
    recipe = plan.recipe
    shows_base = recipe.base_model is not None and plan.method.base != "unused"
    read = plan.read_models
    merged_from = [
        part.path
        for ref in recipe.referenced_models()
        if ref in read
        for part in ref.parts()
        if not part.is_local
    ]
    datasets = [d.path for d in recipe.datasets()] if plan.calibration else []
    diffusion = plan.layout.is_diffusion
    library = "diffusers" if diffusion else "transformers" if plan.layout == TRANSFORMERS else None
    family_tag = {"sd1": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"]}
    data = ModelCardData(
        base_model=merged_from or None,
        datasets=datasets or None,
        base_model_relation="merge" if merged_from else None,
        library_name=library,
        pipeline_tag="text-to-image" if diffusion else None,
        tags=["merge", "mergebot", plan.method.name, *family_tag.get(plan.layout.family, [])],
    )
    models = []
    for ref in recipe.referenced_models():
        source = plan.sources[ref]
        link, revision = _hub_link(ref.base, ref.base.is_local, endpoint), _pin(source.revision)
        if source.adapter is not None:
            adapter = source.adapter
            link += f" + adapter {_hub_link(adapter.ref, adapter.ref.is_local, endpoint)} ({quote.cell(adapter.describe())})"
            revision += f" + `{adapter.revision}`" if adapter.revision else " + local"
        models.append({"link": link, "role": _role(plan, ref, read), "revision": revision})
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        name=quote.cell(name or "Merged model"),
        merged=plan.describe_models(),
        version=mergebot_version(),
        install=install,
        method=plan.method,
        base=quote.text(recipe.base_model) if shows_base else None,
        seed=plan.seed,
        parameters=parameter_rows(plan),
        blocks=block_table(plan),
        layout=plan.layout if plan.layout != TRANSFORMERS else None,
        output_layout=plan.output_format,
        notes=plan.notes,
        models=models,
        recipe=quote.code_block(plan.reproducible_recipe().to_yaml(), "yaml"),
        reproduce=quote.code_block(
            "\n".join(filter(None, [install["command"], command or DEFAULT_COMMAND])), "bash"
        ),
        job_id=job_id,
        credit=credit,
        changes=changes or [],
        calibration=calibration_rows(plan, endpoint),
        alignment=alignment_rows(plan, endpoint),
        align=plan.alignment,
        section=section,
    )
    return ModelCard(tidy(card.content))


def alignment_rows(plan: MergePlan, endpoint: str = PUBLIC_HUB) -> list[dict[str, str]]:
    """Per aligned model: how the search went and where its permutations are."""
    alignment = plan.alignment
    if alignment is None:
        return []
    rows = []
    for ref in alignment.models:
        report = alignment.reports.get(ref)
        if report is None:
            rows.append({"model": _hub_link(ref, ref.is_local, endpoint), "result": "not run yet"})
            continue
        before, after = report.objective[0], report.objective[-1]
        state = "converged" if report.converged else "stopped at max_iter"
        rows.append(
            {
                "model": _hub_link(ref, ref.is_local, endpoint),
                "result": f"score {before:.4g} → {after:.4g}; {report.iterations} pass(es), {state}; {report.seconds:.1f} s",
                "file": quote.code(alignment.files.get(ref, ""), table=True),
            }
        )
    return rows


def calibration_rows(plan: MergePlan, endpoint: str = PUBLIC_HUB) -> list[dict[str, str]]:
    """Per input model: its calibration data, how many examples ran, the statistic."""
    kinds = plan.statistic_kinds()
    rows = []
    for ref, data in plan.calibration.items():
        used = data.samples_used.get(ref)
        rows.append(
            {
                "model": _hub_link(ref, ref.is_local, endpoint),
                "data": data.describe(endpoint),
                "samples": "not run yet" if used is None else str(used),
                "statistic": ", ".join(f"`{k}`" for k in kinds),
            }
        )
    return rows
