"""What a recipe may ask of its sources' layout, checked before anything is planned.

The models must share one layout. Diffusion models and bare state dicts are merged tensor by
tensor, so what needs transformers layers (frankenmerging, alignment, methods that run the
models on data) is refused for them; the diffusion keys (``vae``, ``output_layout``, block
values) are refused for anything else; block values must match the model's block list.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.recipe.schema import BlockValues, ConditionalParameter, ModelReference, Recipe
from merge_engine.sources.formats.blocks import BLOCK_NAME, block_names, describe_blocks
from merge_engine.sources.formats.layouts import TRANSFORMERS, Layout


def _settings(recipe: Recipe) -> Iterator[tuple[str, Any]]:
    """Every parameter setting with its recipe path, filter entries and their values included."""
    for path, block, _ in recipe.parameter_levels():
        for name, setting in (block or {}).items():
            entries = setting if isinstance(setting, list) else [setting]
            for index, entry in enumerate(entries):
                where = f"{path}.{name}" + (f"[{index}]" if isinstance(setting, list) else "")
                yield where, entry


def common_layout(recipe: Recipe, layouts: dict[ModelReference, Layout]) -> Layout:
    """The layout every merged model shares (the VAE to bake aside); mixed layouts are refused."""
    bases = [recipe.base_model] if recipe.base_model else []
    models = list(dict.fromkeys(bases + recipe.input_models()))
    first = models[0]
    for ref in models[1:]:
        if layouts[ref] != layouts[first]:
            raise IncompatibleModelsError(
                f"the recipe mixes layouts: {first} is {layouts[first]} but {ref} is "
                f"{layouts[ref]}; give every model in one layout"
            )
    return layouts[first]


def check_layout(recipe: Recipe, layout: Layout, needs_data: bool, method: str) -> None:
    """Refuse what ``layout`` cannot do, with the field to change."""
    what = f"{recipe.donor()} is {layout}"
    if layout != TRANSFORMERS:
        if recipe.slices:
            raise RecipeError(
                f"frankenmerging stacks the layers of transformers models, and {what}; "
                "merge whole models under 'models'",
                field="slices",
            )
        if recipe.align:
            raise RecipeError(
                f"alignment permutes the hidden units of transformers models, and {what}; "
                "remove 'align'",
                field="align",
            )
        if needs_data:
            raise RecipeError(
                f"{method} runs each model on calibration data, which mergebot does for causal "
                f"LMs and sequence classifiers, and {what}; pick a method without data",
                field="merge_method",
            )
        if recipe.tokenizer_source:
            raise RecipeError(
                f"tokenizer_source picks a transformers tokenizer, and {what}; remove it",
                field="tokenizer_source",
            )
    if not layout.is_diffusion:
        for key in ("vae", "output_layout"):
            if getattr(recipe, key) is not None:
                raise RecipeError(
                    f"{key} applies to diffusion models (SD1.5, SDXL), and {what}; remove it",
                    field=key,
                )
    for where, entry in _settings(recipe):
        _check_setting(entry, where, layout, what)
    if layout.format == "single_file" and recipe.output_layout == "diffusers":
        raise RecipeError(
            "a single-file checkpoint carries no component configs, so mergebot cannot write "
            "it as a diffusers folder; write single_file, or merge diffusers-format models",
            field="output_layout",
        )


def _check_setting(entry: Any, where: str, layout: Layout, what: str) -> None:
    value = entry.value if isinstance(entry, ConditionalParameter) else entry
    if isinstance(entry, ConditionalParameter) and entry.filter and BLOCK_NAME.match(entry.filter):
        if not layout.is_diffusion:
            raise RecipeError(
                f"filter {entry.filter} names a UNet block, and {what}; filter by tensor name",
                field=f"{where}.filter",
            )
        if entry.filter not in block_names(layout.family):
            raise RecipeError(
                f"{layout} has no block {entry.filter}; its blocks are {describe_blocks(layout.family)}",
                field=f"{where}.filter",
            )
    if isinstance(value, BlockValues):
        if not layout.is_diffusion:
            raise RecipeError(
                f"block values are one value per UNet block of a diffusion model, and {what}; "
                "use a number, a gradient or filters",
                field=where,
            )
        expected = len(block_names(layout.family))
        if len(value.blocks) != expected:
            raise RecipeError(
                f"has {len(value.blocks)} block values, but {layout} needs {expected}, one per "
                f"block in this order: {describe_blocks(layout.family)}",
                field=f"{where}.blocks",
            )
