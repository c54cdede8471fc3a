"""mergebot's merge engine: mergekit-style recipes, streamed merges, model cards.

    from merge_engine import load_recipe, preflight, merge
    plan = preflight(load_recipe("recipe.yaml"))   # headers only: errors before any download
    merge(plan, "./merged")                          # streams tensors, writes card and recipe

In memory: :func:`merge_models` and :func:`merge_into` (see :mod:`merge_engine.run.memory`).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merge_engine.errors import MergeError
    from merge_engine.plan.adapter_plan import AdapterPlan
    from merge_engine.plan.kinds import Plan
    from merge_engine.plan.lora_file_plan import LoraFilePlan
    from merge_engine.plan.merge_plan import MergePlan
    from merge_engine.plan.planner import build_plan
    from merge_engine.recipe.schema import ModelReference, Recipe, load_recipe, parse_recipe
    from merge_engine.run.memory import merge_into, merge_models

# Imported on first use (PEP 562), so that importing any submodule, the CLI's among them,
# does not pay for torch, scipy and transformers until a name that needs them is used.
_LAZY = {
    "AdapterPlan": "merge_engine.plan.adapter_plan",
    "LoraFilePlan": "merge_engine.plan.lora_file_plan",
    "MergeError": "merge_engine.errors",
    "MergePlan": "merge_engine.plan.merge_plan",
    "ModelReference": "merge_engine.recipe.schema",
    "Recipe": "merge_engine.recipe.schema",
    "build_plan": "merge_engine.plan.planner",
    "load_recipe": "merge_engine.recipe.schema",
    "merge_into": "merge_engine.run.memory",
    "merge_models": "merge_engine.run.memory",
    "parse_recipe": "merge_engine.recipe.schema",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def preflight(
    recipe: Recipe,
    *,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> Plan:
    """Validate a recipe against the models' configs and safetensors headers; download no
    weight (a Hub calibration dataset is pinned, not downloaded). ``hub_only`` reads every
    reference from the Hub, never a local folder or file; ``cache_dir`` keeps what is read
    (config.json) out of the shared Hugging Face cache. A recipe with ``output: adapter``
    gives an :class:`AdapterPlan` (LoRA adapters combined into one adapter), or with an SD
    base a :class:`LoraFilePlan` (SD LoRA files merged into one LoRA file)."""
    if recipe.output == "adapter":
        return _preflight_adapter(recipe, token, allow_pickle, hub_only, cache_dir)
    from merge_engine.data.calibration import resolve_recipe as resolve_calibration
    from merge_engine.methods import get_method
    from merge_engine.plan.planner import build_plan
    from merge_engine.sources.inspection import inspect_recipe_models

    sources = inspect_recipe_models(
        recipe.referenced_models(), token, allow_pickle, hub_only, cache_dir
    )
    calibration = (
        resolve_calibration(recipe, token, hub_only)
        if get_method(recipe.merge_method).needs_data or recipe.aligns_on_data()
        else {}
    )
    return build_plan(recipe, sources, calibration=calibration)


def _preflight_adapter(
    recipe: Recipe,
    token: str | bool | None,
    allow_pickle: bool,
    hub_only: bool,
    cache_dir: Path | None,
) -> AdapterPlan | LoraFilePlan:
    """The base's config and header and each adapter's, then the plan (for an SD base: each
    LoRA file's header, merged into one kohya-format LoRA file)."""
    from merge_engine.plan.adapter_plan import build_adapter_plan
    from merge_engine.plan.adapter_recipe import read_combination
    from merge_engine.sources.formats.peft_adapter import read_adapter
    from merge_engine.sources.inspection import inspect_model

    combination, weights = read_combination(recipe)  # the recipe's mistakes before any read
    base = inspect_model(recipe.base_model, token, allow_pickle, hub_only, cache_dir)
    if base.layout.is_diffusion:  # SD LoRA files into one kohya LoRA file
        from merge_engine.plan.lora_file_plan import build_lora_file_plan

        loras = [inspect_model(r, token, False, hub_only, cache_dir) for r in recipe.input_models()]
        return build_lora_file_plan(
            base,
            loras,
            weights,
            combination.type,
            combination.svd_rank,
            recipe,
            combination.svd_clamp,
        )
    adapters = [read_adapter(ref, token, hub_only, cache_dir) for ref in recipe.input_models()]
    return build_adapter_plan(recipe, base, adapters)


def merge(
    recipe_or_plan: Recipe | MergePlan | AdapterPlan | LoraFilePlan,
    out_dir: str | Path,
    **options: Any,
) -> Path:
    """Run a merge end to end into ``out_dir`` (see :func:`merge_engine.run.executor.write_merge`
    for options; an adapter output: :func:`merge_engine.run.adapter_merge.write_adapter_merge`)."""
    from merge_engine.plan.adapter_plan import AdapterPlan
    from merge_engine.plan.lora_file_plan import LoraFilePlan
    from merge_engine.plan.merge_plan import MergePlan
    from merge_engine.run.executor import write_merge

    token = options.get("token")
    plan = (
        recipe_or_plan
        if isinstance(recipe_or_plan, MergePlan | AdapterPlan | LoraFilePlan)
        else preflight(recipe_or_plan, token=token)
    )
    if isinstance(plan, LoraFilePlan):
        from merge_engine.run.lora_merge import write_lora_file_merge

        kept = ("token", "cache_dir", "show_progress", "progress")  # a file of factors: no shards
        return write_lora_file_merge(plan, out_dir, **{k: options[k] for k in kept if k in options})
    if isinstance(plan, AdapterPlan):
        from merge_engine.run.adapter_merge import write_adapter_merge

        return write_adapter_merge(plan, out_dir, **options)
    return write_merge(plan, out_dir, **options)


__all__ = [
    "AdapterPlan",
    "LoraFilePlan",
    "MergeError",
    "MergePlan",
    "ModelReference",
    "Recipe",
    "build_plan",
    "load_recipe",
    "merge",
    "merge_into",
    "merge_models",
    "parse_recipe",
    "preflight",
]
