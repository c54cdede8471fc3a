"""The card of Stable Diffusion LoRA files merged into one (``output: adapter`` with an SD
base): which files, with which weights and pinned revisions, how they were combined, how to
load the result in diffusers and the WebUI, and how to reproduce it. The recipe also travels in
the file's own header (``mergebot_recipe``), where the WebUI's metadata viewer shows it."""

from __future__ import annotations

from huggingface_hub import ModelCardData, constants

from merge_engine.output.card import _hub_link, install_instructions, mergebot_version, tidy
from merge_engine.output.kohya_lora import LORA_FILE
from merge_engine.plan.lora_file_plan import LoraFilePlan
from merge_engine.recipe import quote

DEFAULT_COMMAND = "mergebot merge mergebot_recipe.yaml ./lora"
COMBINED = {
    "cat": "the factors side by side: the file's update is exactly the weighted sum of the "
    "LoRAs' updates (sd-scripts' `merge_lora.py --concat`)",
    "svd": "the weighted sum of the LoRAs' updates, cut to the rank below by a truncated SVD "
    "per module (sd-scripts' `svd_merge_lora.py`)",
}


def build_lora_file_card(
    plan: LoraFilePlan,
    name: str | None = None,
    command: str | None = None,
    job_id: str | None = None,
    credit: str | None = None,
    endpoint: str | None = None,
    repo_id: str | None = None,
    changes: list[str] | None = None,
) -> str:
    """The whole ``README.md``, front matter included; arguments as
    :func:`merge_engine.output.adapter_card.build_adapter_card`'s."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    base = plan.base.ref
    ranks = sorted({m.planned.rank for m in plan.modules})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"
    where = repo_id or name or "./lora"
    usage = "\n".join(
        [
            "from diffusers import StableDiffusionPipeline  # StableDiffusionXLPipeline for SDXL",
            "",
            f"pipe = StableDiffusionPipeline.from_pretrained({str(base.path)!r})",
            f"pipe.load_lora_weights({where!r}, weight_name={LORA_FILE!r})",
        ]
    )
    lines = [
        f"# {quote.text(name or 'Merged LoRA')}",
        "",
        f"This LoRA combines {quote.text(plan.describe_models())}, made with mergebot "
        f"{mergebot_version()}. It is one kohya-format file, `{LORA_FILE}`, which the WebUIs "
        "load as a LoRA and diffusers loads onto its base:",
        "",
        quote.code_block(usage, "python"),
    ]
    if job_id:
        lines += ["", f"Merged by the mergebot service, job `{job_id}`. {credit or ''}".rstrip()]
    if changes:
        lines += ["", "## Changes since the last merge", ""]
        lines += ["The sources moved; the same recipe was merged again:", ""]
        lines += [f"- {quote.text(change)}" for change in changes]
    base_revision = f" at `{plan.base.revision}`" if plan.base.revision else ""
    lines += [
        "",
        "## Combination",
        "",
        f"**`{plan.combination}`**: {COMBINED[plan.combination]}; rank {rank}, "
        f"{len(plan.modules)} modules.",
        "",
        f"Base model: {_hub_link(base, base.is_local, endpoint)}{base_revision}",
        "",
        "## LoRA files",
        "",
        "| LoRA | weight | revision |",
        "|---|---|---|",
    ]
    for lora, weight in zip(plan.loras, plan.weights, strict=True):
        revision = f"`{lora.revision}`" if lora.revision else "local"
        link = _hub_link(lora.ref, lora.ref.is_local, endpoint)
        lines.append(f"| {link} | {quote.cell(weight)} | {revision} |")
    recipe = plan.reproducible_recipe()
    if recipe is not None:
        lines += ["", "## Recipe", "", quote.code_block(recipe.to_yaml(), "yaml")]
    install = install_instructions(endpoint)
    reproduce = "\n".join(filter(None, [install["command"], command or DEFAULT_COMMAND]))
    lines += ["", "## Reproduce", "", install["prose"], "", quote.code_block(reproduce, "bash")]
    data = ModelCardData(
        library_name="diffusers",
        base_model=None if base.is_local else base.path,
        base_model_relation=None if base.is_local else "adapter",
        tags=["lora", "stable-diffusion", "text-to-image", "merge", "mergebot", plan.combination],
    )
    return f"---\n{data.to_yaml()}\n---\n\n{tidy(chr(10).join(lines))}\n"
