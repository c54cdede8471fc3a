"""The Space's merge form as plain data, and its two-way mapping to a recipe — no Gradio here,
so the mapping is tested directly and the UI only moves values in and out.

The form shows what most recipes use: a method, its global parameters, up to ``MAX_MODELS``
rows (repo, revision, an optional LoRA adapter applied to it, optional layer range, per-model
parameters), a base model and a dtype. A row's adapter makes its reference ``base+adapter``,
mergekit's notation, which the YAML shows.
A row with a layer range turns the recipe into ``slices`` (a frankenmerge); gradients, filter
lists and multi-source slices stay in the YAML, and the form says so.

For diffusion models (SD1.5, SDXL) a row also takes one value per UNet block ("MBW", as
supermerger and the WebUI type it: one comma-separated row, ``BASE, IN00…, M00, OUT00…``) for
the method's per-model weight; the form learns the models' family from the Space, which
inspects the first model (``MergeForm.family``), since a recipe does not say it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from merge_engine.errors import RecipeError
from merge_engine.methods import all_methods, get_method
from merge_engine.methods.registry import Param
from merge_engine.recipe.limits import DEFAULT_LIMITS, RecipeLimits, load_yaml
from merge_engine.sources.formats.blocks import block_names

MAX_MODELS = 6
DTYPES = ["", "float32", "float16", "bfloat16"]
LAYERS_LABEL = "layers [start-end)"
LAYERS_HELP = (
    "half-open, like Python's range: 0-3 takes layers 0, 1 and 2, not 3; empty takes them all"
)


def _union(scope: str) -> dict[str, Param]:
    """Every parameter name of ``scope`` across the registry, with its first declaration."""
    params: dict[str, Param] = {}
    for method in all_methods():
        for param in method.params:
            if param.scope == scope:
                params.setdefault(param.name, param)
    return params


GLOBAL_PARAMS = _union("global")
PER_MODEL_PARAMS = _union("per_model")


def method_params(method: str, scope: str) -> dict[str, Param]:
    """The parameters ``method`` declares in ``scope``, by name (none for an unknown method)."""
    try:
        declared = get_method(method).params
    except Exception:  # noqa: BLE001  (an unknown name: the pre-flight reports it)
        return {}
    return {p.name: p for p in declared if p.scope == scope}


def param_help(param: Param, required: str = "required") -> str:
    """The help text of a parameter's field, all from the declaration of the method shown:
    what it does, its bounds, its default (or ``required``: that it is, and when)."""
    parts = [param.doc] if param.doc else []
    if param.bounds_text():
        parts.append(f"in {param.bounds_text()}")
    if param.choices:
        parts.append("one of " + ", ".join(param.choices))
    if param.required:
        parts.append(required)
    else:
        default = param.default
        shown = (
            str(default).lower()
            if isinstance(default, bool)
            else f"{default:g}"
            if isinstance(default, float)
            else default
        )
        parts.append(f"default {shown}")
    return "; ".join(parts)


@dataclass
class ModelRow:
    repo: str = ""
    revision: str = ""
    layers: str = ""
    """``start-end``, half-open, as in ``layer_range``; empty for the whole model."""
    params: dict[str, Any] = field(default_factory=dict)
    blocks: str = ""
    """One value per UNet block for the method's block parameter (:func:`block_param`), as
    typed: comma-separated, in block order; empty for the plain scalar."""
    set_aside: dict[str, Any] = field(default_factory=dict)
    """What the person set for per-model parameters the method shown lacks (:func:`switch_method`)."""
    adapter: str = ""
    """A LoRA adapter applied to the model before merging, ``org/name[@revision]``; empty
    for none."""

    @property
    def reference(self) -> str:
        model = (
            f"{self.repo.strip()}@{self.revision.strip()}"
            if self.revision.strip()
            else self.repo.strip()
        )
        return f"{model}+{self.adapter.strip()}" if self.adapter.strip() else model


@dataclass
class MergeForm:
    method: str = "ties"
    params: dict[str, Any] = field(default_factory=dict)
    models: list[ModelRow] = field(default_factory=list)
    base_model: str = ""
    dtype: str = ""
    notice: str = ""
    """Why the form cannot show all of a recipe (the YAML then holds the rest)."""
    family: str = ""
    """The models' family as the Space found it by inspecting the first model (``sd1``,
    ``sdxl``, ``transformers``, ``state_dict``); empty while unknown. It decides which fields
    show, never what the recipe says."""
    set_aside: dict[str, Any] = field(default_factory=dict)
    """What the person set for global parameters the method shown lacks, kept for a method
    that has them again (:func:`switch_method`); never part of the recipe."""

    @property
    def is_diffusion(self) -> bool:
        return self.family in DIFFUSION_FAMILIES


DIFFUSION_FAMILIES = ("sd1", "sdxl")
FAMILY_NAMES = {"sd1": "SD1.5", "sdxl": "SDXL"}


def block_param(method: str) -> str | None:
    """The per-model parameter a row of block values sets: ``weight`` where the method
    declares it, else its first numeric per-model parameter (passthrough's ``scale``); None
    for a method without one (slerp's ``t`` is global)."""
    declared = method_params(method, "per_model")
    if "weight" in declared:
        return "weight"
    return next((name for name, p in declared.items() if p.type in (float, int)), None)


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def parse_blocks(text: str) -> list[int | float] | str:
    """A typed row of block values (commas or spaces between them) as numbers; the text
    itself when a part is not a number, so that the engine refuses it with its sentence."""
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    try:
        return [_plain(float(part)) for part in parts]
    except ValueError:
        return text.strip()


def blocks_text(values: Any) -> str | None:
    """A recipe's ``blocks`` (a list of numbers or a comma-separated row) as the form's row,
    or None when it is something the form cannot show."""
    if isinstance(values, str):
        parsed = parse_blocks(values)
        return None if isinstance(parsed, str) else blocks_text(parsed)
    if (
        not values
        or not isinstance(values, list)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        return None
    return ",".join(str(_plain(v)) for v in values)


@dataclass(frozen=True)
class BlockField:
    """How a row's block field shows: whether, its label, and its header (the block names)."""

    visible: bool
    label: str = ""
    info: str = ""


def block_header(family: str) -> str:
    """The block names of ``family`` in the order its values are typed, and their count:
    ``26 values, comma-separated, in this order: BASE IN00 … OUT11``."""
    names = block_names(family)
    return f"{len(names)} values, comma-separated, in this order: {' '.join(names)}"


def block_field(form: MergeForm, row: ModelRow) -> BlockField:
    """The block field of ``row``: shown for diffusion models when the method has a
    parameter to set per block (and wherever a row already holds values, so they can be
    seen and cleared), headed by the block names in the order the values are typed."""
    param = block_param(form.method)
    if param is None or not (form.is_diffusion or row.blocks.strip()):
        return BlockField(False)
    empty = f"empty: the {param} field applies to every block"
    if form.is_diffusion:
        header = block_header(form.family)
    else:  # values from a recipe, the models not inspected (yet)
        header = "one value per UNet block; " + "; ".join(
            f"{FAMILY_NAMES[f]}: {block_header(f)}" for f in DIFFUSION_FAMILIES
        )
    return BlockField(True, f"{param} per block", f"{header}; {empty}")


def row_param_help(form: MergeForm, row: ModelRow, param: Param) -> str:
    """The help text of ``param``'s field in ``row``: the method's (:func:`param_help`), except
    that the parameter a shown block row sets is not required, since the row replaces it."""
    if param.name == block_param(form.method) and block_field(form, row).visible:
        return param_help(
            param,
            f"required unless the '{param.name} per block' row below is filled, which replaces it",
        )
    return param_help(param)


def shows_layers(form: MergeForm, row: ModelRow) -> bool:
    """Whether ``row``'s layer range shows: not for diffusion models, which are merged whole
    (unless the row already holds a range, so it can be seen and cleared)."""
    return not form.is_diffusion or bool(row.layers.strip())


def layout_reference(repo: str, revision: str, base_model: str) -> str | None:
    """The model whose layout tells the form's family: the first model, else the base."""
    if (repo or "").strip():
        return ModelRow(repo, revision or "").reference
    return (base_model or "").strip() or None


def _is_set(value: Any) -> bool:
    return value is not None and value != ""


def _number(param: Param, value: Any) -> Any:
    return (
        int(value)
        if param.type is int and isinstance(value, float) and value.is_integer()
        else value
    )


def to_recipe(form: MergeForm) -> dict[str, Any]:
    """The recipe mapping the form describes (defaults left out, required values kept)."""
    recipe: dict[str, Any] = {"merge_method": form.method}
    if form.base_model.strip():
        recipe["base_model"] = form.base_model.strip()
    declared = method_params(form.method, "global")
    params = {
        name: _number(param, form.params[name])
        for name, param in declared.items()
        if _is_set(form.params.get(name)) and (param.required or form.params[name] != param.default)
    }
    if params:
        recipe["parameters"] = params
    per_model = method_params(form.method, "per_model")
    rows = [row for row in form.models if row.repo.strip()]
    block = block_param(form.method)
    entries = []
    for row in rows:
        entry: dict[str, Any] = {"model": row.reference}
        values = {
            name: _number(per_model[name], value)
            for name, value in row.params.items()
            if name in per_model and _is_set(value)
        }
        if block and row.blocks.strip():
            values[block] = {"blocks": parse_blocks(row.blocks)}
        if values:
            entry["parameters"] = values
        entries.append(entry)
    if any(row.layers.strip() for row in rows):
        slices = []
        for row, entry in zip(rows, entries, strict=True):
            source = dict(entry)
            if row.layers.strip():
                start, _, end = row.layers.partition("-")
                source["layer_range"] = [int(start), int(end)]
            slices.append({"sources": [source]})
        recipe["slices"] = slices
    else:
        recipe["models"] = entries
    if form.dtype:
        recipe["dtype"] = form.dtype
    return recipe


FORM_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype"}


def carry_over(recipe: dict[str, Any], previous: Any) -> dict[str, Any]:
    """Keep what the previous recipe held beyond the form (calibration data, a tokenizer
    source, a seed ...): its other top-level keys, and each model's calibration block, matched
    by model reference."""
    if not isinstance(previous, dict):
        return recipe
    kept = {k: v for k, v in previous.items() if k not in FORM_KEYS}
    blocks = {
        entry.get("model"): entry["calibration"]
        for entry in previous.get("models") or []
        if isinstance(entry, dict) and "calibration" in entry
    }
    for entry in recipe.get("models") or []:
        if entry["model"] in blocks:
            entry["calibration"] = blocks[entry["model"]]
    return {**recipe, **kept}


def previous_document(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> Any:
    """What the YAML box held before the form changed, or None when it held nothing readable
    within ``limits`` (the form then writes its own document whole)."""
    try:
        return load_yaml(text, limits) if text else None
    except RecipeError:
        return None


def to_yaml(form: MergeForm, previous_text: str = "") -> str:
    """The form's recipe as YAML, keeping what ``previous_text`` held beyond the form."""
    recipe = carry_over(to_recipe(form), previous_document(previous_text))
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def switch_method(form: MergeForm, previous: str) -> MergeForm:
    """``form`` (already naming its new method) after a change of method from ``previous``.

    A value the person set (not the previous method's default) stays where the new method
    declares a parameter of that name; an untouched one becomes the new method's default,
    since one name can mean different things (slerp's ``t`` is not nearswap's). A set value
    the new method lacks is set aside, and comes back when a method that has it is chosen,
    however many methods without it came between (ties → slerp → dare_ties keeps the
    weights and densities)."""
    old_global, new_global = method_params(previous, "global"), method_params(form.method, "global")
    params, set_aside = _switched(form.params, form.set_aside, old_global, new_global)
    old_row, new_row = method_params(previous, "per_model"), method_params(form.method, "per_model")
    models = []
    for row in form.models:
        values, row_aside = _switched(row.params, row.set_aside, old_row, new_row)
        models.append(replace(row, params=values, set_aside=row_aside))
    return replace(form, params=params, models=models, set_aside=set_aside)


def _switched(
    values: dict[str, Any], set_aside: dict[str, Any], old: dict[str, Param], new: dict[str, Param]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One scope's values, and what is set aside, after a change of method whose parameters
    were ``old`` and are ``new`` (by name). The values of parameters neither method shows
    stay as they were: their fields are hidden, and the recipe never reads them."""
    chosen = dict(set_aside)
    for name, param in old.items():
        value = values.get(name)
        if _is_set(value) and (param.required or value != param.default):
            chosen[name] = value
        else:
            chosen.pop(name, None)
    shown = {
        name: chosen.get(name, None if param.required else param.default)
        for name, param in new.items()
    }
    return {**values, **shown}, {name: v for name, v in chosen.items() if name not in new}


def from_recipe(data: Any) -> MergeForm:
    """Fill the form from a recipe mapping, as far as the form can show it."""
    if not isinstance(data, dict):
        return MergeForm(notice="the recipe is not a YAML mapping")
    form = MergeForm(method=str(data.get("merge_method", "")), dtype=str(data.get("dtype") or ""))
    block = block_param(form.method)
    hidden: list[str] = []
    base = data.get("base_model")
    form.base_model = base if isinstance(base, str) else ""
    for name, value in (data.get("parameters") or {}).items():
        if isinstance(value, (int, float, str, bool)):
            form.params[name] = value
        else:
            hidden.append(f"parameters.{name}")
    if data.get("slices"):
        for index, piece in enumerate(data["slices"]):
            sources = piece.get("sources") or [] if isinstance(piece, dict) else []
            if len(sources) != 1:
                hidden.append(f"slices[{index}] (several sources)")
                continue
            row = _row(sources[0], hidden, f"slices[{index}]", block)
            layer_range = sources[0].get("layer_range")
            if isinstance(layer_range, list) and len(layer_range) == 2:
                row.layers = f"{layer_range[0]}-{layer_range[1]}"
            form.models.append(row)
    else:
        for index, entry in enumerate(data.get("models") or []):
            form.models.append(_row(entry, hidden, f"models[{index}]", block))
    hidden += [k for k in data if k not in FORM_KEYS]
    if len(form.models) > MAX_MODELS:
        hidden.append(f"models beyond the first {MAX_MODELS}")
        form.models = form.models[:MAX_MODELS]
    if hidden:
        form.notice = "shown in the YAML tab only: " + ", ".join(hidden)
    return form


def _row(entry: Any, hidden: list[str], where: str, block: str | None = None) -> ModelRow:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        hidden.append(where)
        return ModelRow()
    model, _, adapter = entry["model"].partition("+")
    repo, _, revision = model.partition("@")
    row = ModelRow(repo=repo, revision=revision, adapter=adapter)
    if "calibration" in entry:
        hidden.append(f"{where}.calibration")
    for name, value in (entry.get("parameters") or {}).items():
        if isinstance(value, (int, float, bool)):
            row.params[name] = value
        elif name == block and (typed := _block_row(value)) is not None:
            row.blocks = typed
        else:
            hidden.append(f"{where}.parameters.{name}")
    return row


def _block_row(value: Any) -> str | None:
    """``{blocks: ...}`` as the form's row, or None for any other value."""
    if isinstance(value, dict) and set(value) == {"blocks"}:
        return blocks_text(value["blocks"])
    return None


@dataclass(frozen=True)
class ExampleModels:
    """The repos the examples name: a base, three of its fine-tunes, and their layer count."""

    base: str
    fine_tunes: tuple[str, str, str]
    layers: int
    diffusion: tuple[str, str]
    """Two SD1.5 checkpoints in the diffusers layout, for the block-weighted example."""


DEMO_MODELS = ExampleModels(
    "demo/base",
    ("demo/math", "demo/code", "demo/chat"),
    layers=4,
    diffusion=("demo/sd-dreamy", "demo/sd-photo"),
)
"""The offline demo's tiny models, which exist only on its sandbox hub."""
HUB_MODELS = ExampleModels(
    "Qwen/Qwen2.5-0.5B",
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B"),
    layers=24,
    diffusion=("Lykon/dreamshaper-8", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
)
"""Small public models on the Hub: a base and three models trained from it; two SD1.5
checkpoints."""
FIRST_EXAMPLE = "TIES: a base and 3 fine-tunes"


IN_BLOCKS_FROM_A = "0.5," + ",".join(["1"] * 12) + ",0.5," + ",".join(["0"] * 12)
OUT_BLOCKS_FROM_B = "0.5," + ",".join(["0"] * 12) + ",0.5," + ",".join(["1"] * 12)
"""A·(1−M) + B·M with M = 0 in the input blocks, 1 in the output blocks, ½ elsewhere: the
composition of one model, the rendering of the other."""


def examples(models: ExampleModels) -> dict[str, MergeForm]:
    """The form's examples, naming ``models``; each name says what it merges."""
    a, b, c = models.fine_tunes
    quarter = models.layers // 4
    return {
        "SLERP of two models": MergeForm(
            method="slerp", params={"t": 0.5}, models=[ModelRow(a), ModelRow(b)], base_model=a
        ),
        FIRST_EXAMPLE: MergeForm(
            method="ties",
            models=[
                ModelRow(a, params={"weight": 1.0, "density": 0.5}),
                ModelRow(b, params={"weight": 0.7, "density": 0.5}),
                ModelRow(c, params={"weight": 0.5, "density": 0.5}),
            ],
            base_model=models.base,
        ),
        "SD1.5 weighted sum per block (MBW)": MergeForm(
            method="linear",
            models=[
                ModelRow(models.diffusion[0], blocks=IN_BLOCKS_FROM_A),
                ModelRow(models.diffusion[1], blocks=OUT_BLOCKS_FROM_B),
            ],
        ),
        "Frankenmerge (layer stacking)": MergeForm(
            method="passthrough",
            models=[
                ModelRow(a, layers=f"0-{models.layers - quarter}"),
                ModelRow(b, layers=f"{quarter}-{models.layers}"),
            ],
        ),
    }


def error_place(field: str | None, message: str, repos: list[str]) -> str:
    """Which part of the form an error belongs next to: ``method``, ``parameters``,
    ``base_model``, ``model-<i>`` (the row of the model it names), ``models`` (the list as a
    whole), ``dtype``, ``target`` or ``recipe`` (the YAML)."""
    if field:
        head = field.split(".")[0]
        name = head.split("[")[0]
        if name in ("slices", "models", "tokenizer_source"):
            index = re.fullmatch(r"(?:models|slices)\[(\d+)\]", head)
            if index and int(index.group(1)) < MAX_MODELS:
                return f"model-{index.group(1)}"
            return "models"
        if name in ("merge_method", "parameters", "base_model", "target"):
            return "method" if name == "merge_method" else name
        if name in ("dtype", "out_dtype"):
            return "dtype"
        return "recipe"
    for index, repo in enumerate(repos[:MAX_MODELS]):
        # a plain search first: a repo pasted 200 KB long is not compiled into a pattern
        if (
            repo
            and repo in message
            and re.search(rf"(?<![\w./-]){re.escape(repo)}(?![\w/-])", message)
        ):
            return f"model-{index}"
    return "recipe"


def field_line(text: str, field: str | None) -> int | None:
    """The line (1-based) of ``text``'s YAML that ``field`` (``models[1].parameters.density``)
    names, or of the deepest part of it the text has; None when the text does not parse."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", field or ""):
        if part.startswith("[") and isinstance(node, yaml.SequenceNode):
            index = int(part[1:-1])
            if index >= len(node.value):
                break
            node = node.value[index]
        elif isinstance(node, yaml.MappingNode):
            pair = next((p for p in node.value if getattr(p[0], "value", None) == part), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            node = pair[1]
            continue
        else:
            break
        line = node.start_mark.line + 1
    return line
