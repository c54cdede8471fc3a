"""The Space's merge form as plain data, and its two-way mapping to a recipe — no Gradio here,
so the mapping is tested directly and the UI only moves values in and out.

The form shows what most recipes use: a method, its global parameters, up to ``MAX_MODELS``
rows (repo, revision, optional layer range, per-model parameters), a base model and a dtype.
A row with a layer range turns the recipe into ``slices`` (a frankenmerge); gradients, filter
lists and multi-source slices stay in the YAML, and the form says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from merge_engine.methods import all_methods, get_method
from merge_engine.methods.registry import Param

MAX_MODELS = 6
DTYPES = ["", "float32", "float16", "bfloat16"]


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


@dataclass
class ModelRow:
    repo: str = ""
    revision: str = ""
    layers: str = ""
    """``start-end``, half-open, as in ``layer_range``; empty for the whole model."""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return (
            f"{self.repo.strip()}@{self.revision.strip()}"
            if self.revision.strip()
            else self.repo.strip()
        )


@dataclass
class MergeForm:
    method: str = "ties"
    params: dict[str, Any] = field(default_factory=dict)
    models: list[ModelRow] = field(default_factory=list)
    base_model: str = ""
    dtype: str = ""
    notice: str = ""
    """Why the form cannot show all of a recipe (the YAML then holds the rest)."""


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
    entries = []
    for row in rows:
        entry: dict[str, Any] = {"model": row.reference}
        values = {
            name: _number(per_model[name], value)
            for name, value in row.params.items()
            if name in per_model and _is_set(value)
        }
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


def to_yaml(form: MergeForm, previous_text: str = "") -> str:
    """The form's recipe as YAML, keeping what ``previous_text`` held beyond the form."""
    try:
        previous = yaml.safe_load(previous_text) if previous_text else None
    except yaml.YAMLError:
        previous = None
    recipe = carry_over(to_recipe(form), previous)
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def from_recipe(data: Any) -> MergeForm:
    """Fill the form from a recipe mapping, as far as the form can show it."""
    if not isinstance(data, dict):
        return MergeForm(notice="the recipe is not a YAML mapping")
    form = MergeForm(method=str(data.get("merge_method", "")), dtype=str(data.get("dtype") or ""))
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
            row = _row(sources[0], hidden, f"slices[{index}]")
            layer_range = sources[0].get("layer_range")
            if isinstance(layer_range, list) and len(layer_range) == 2:
                row.layers = f"{layer_range[0]}-{layer_range[1]}"
            form.models.append(row)
    else:
        for index, entry in enumerate(data.get("models") or []):
            form.models.append(_row(entry, hidden, f"models[{index}]"))
    hidden += [k for k in data if k not in FORM_KEYS]
    if len(form.models) > MAX_MODELS:
        hidden.append(f"models beyond the first {MAX_MODELS}")
        form.models = form.models[:MAX_MODELS]
    if hidden:
        form.notice = "shown in the YAML tab only: " + ", ".join(hidden)
    return form


def _row(entry: Any, hidden: list[str], where: str) -> ModelRow:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        hidden.append(where)
        return ModelRow()
    repo, _, revision = entry["model"].partition("@")
    row = ModelRow(repo=repo, revision=revision)
    if "calibration" in entry:
        hidden.append(f"{where}.calibration")
    for name, value in (entry.get("parameters") or {}).items():
        if isinstance(value, (int, float, bool)):
            row.params[name] = value
        else:
            hidden.append(f"{where}.parameters.{name}")
    return row


EXAMPLES: dict[str, MergeForm] = {
    "SLERP of two models": MergeForm(
        method="slerp",
        params={"t": 0.5},
        models=[ModelRow("demo/math"), ModelRow("demo/code")],
        base_model="demo/math",
    ),
    "TIES of three": MergeForm(
        method="ties",
        models=[
            ModelRow("demo/math", params={"weight": 1.0, "density": 0.5}),
            ModelRow("demo/code", params={"weight": 0.7, "density": 0.5}),
            ModelRow("demo/chat", params={"weight": 0.5, "density": 0.5}),
        ],
        base_model="demo/base",
    ),
    "Frankenmerge (layer stacking)": MergeForm(
        method="passthrough",
        models=[ModelRow("demo/math", layers="0-3"), ModelRow("demo/code", layers="1-4")],
    ),
}


def error_place(field: str | None, message: str, repos: list[str]) -> str:
    """Which part of the form an error belongs next to: ``method``, ``parameters``,
    ``base_model``, ``models``, ``dtype``, ``target`` or ``recipe`` (the YAML)."""
    if field:
        head = field.split(".")[0].split("[")[0]
        if head in ("slices", "models", "tokenizer_source"):
            return "models"
        if head in ("merge_method", "parameters", "base_model", "target"):
            return "method" if head == "merge_method" else head
        if head in ("dtype", "out_dtype"):
            return "dtype"
        return "recipe"
    if any(repo and repo in message for repo in repos):
        return "models"
    return "recipe"
