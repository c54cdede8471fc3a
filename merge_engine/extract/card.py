"""The card of an extracted adapter: where it came from (both models, pinned), how to load
it, the rank and the relative Frobenius error ‖ΔW − B·A‖_F / ‖ΔW‖_F of every module, what is
stored whole, and every tensor that differs between fine-tune and base but is not in the
adapter."""

from __future__ import annotations

import shlex

from huggingface_hub import constants

from merge_engine.extract.plan import ExtractionPlan
from merge_engine.extract.result import ExtractionResult
from merge_engine.output.card import install_instructions, mergebot_version
from merge_engine.output.peft_adapter import adapter_card
from merge_engine.recipe import quote
from merge_engine.sources.inspection import ModelSource

LEFT_OUT_ROWS = 30
"""At most this many of the differing tensors left out are listed (the largest differences)."""


def pinned(source: ModelSource) -> str:
    """The reference with its commit, as a command reproduces it: ``org/name@sha`` or a folder."""
    return f"{source.ref.path}@{source.revision}" if source.revision else source.ref.path


def reproduce_command(plan: ExtractionPlan, out: str = "./adapter") -> str:
    words = ["mergebot", "extract-lora", pinned(plan.finetune), out, "--base", pinned(plan.base)]
    words += ["--rank", str(plan.rank)] if plan.rank is not None else []
    words += ["--energy", f"{plan.energy:g}"] if plan.energy is not None else []
    for name in plan.saved:
        words += ["--save", name.rpartition(".")[0]]
    words += ["--lora-embeddings"] if any(m.kind == "embedding" for m in plan.modules) else []
    return shlex.join(words)


def _source_row(source: ModelSource, role: str) -> str:
    where = f"`{source.revision}`" if source.revision else source.ref.local_kind()
    return f"| {quote.code(source.ref.path, table=True)} | {role} | {where} |"


def extraction_card(
    plan: ExtractionPlan, result: ExtractionResult, name: str, command: str | None = None
) -> str:
    base_hub_id = None if plan.base.ref.is_local else plan.base.ref.path
    ranks = sorted({m.rank for m in result.modules})
    errors = [m.relative_error for m in result.modules]
    worst = max(result.modules, key=lambda m: m.relative_error)
    how = (
        f"rank {plan.rank}"
        if plan.energy is None
        else f"the smallest rank keeping {plan.energy:g} of each difference's squared singular values"
        + (f" (at most {plan.rank})" if plan.rank is not None else "")
    )
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"
    lines = [
        f"# {quote.cell(name)}",
        "",
        f"A LoRA adapter extracted by mergebot {quote.text(mergebot_version())} from the fine-tune "
        f"{quote.code(plan.finetune.ref.path)} against its base {quote.code(plan.base.ref.path)}: "
        f"each linear layer's difference ΔW = W_fine-tune − W_base, factored by the truncated "
        f"SVD at {how}. Loaded on the base, each module computes W_base + B·A.",
        "",
        "## Use",
        "",
        quote.code_block(
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({plan.base.ref.path!r}"
            + (f", revision={plan.base.revision!r}" if plan.base.revision else "")
            + ")\n"
            f"model = PeftModel.from_pretrained(base, {name!r})  # this folder or repo\n"
            "merged = model.merge_and_unload()  # optional: W_base + B·A baked in",
            "python",
        ),
        "",
        "## Sources",
        "",
        "| model | role | revision |",
        "|---|---|---|",
        _source_row(plan.finetune, "fine-tune"),
        _source_row(plan.base, "base"),
        "",
        "## Modules",
        "",
        f"{len(result.modules)} modules, rank {rank_text}, factors in `{str(plan.dtype).removeprefix('torch.')}`. "
        f"The error is the relative Frobenius error ‖ΔW − B·A‖_F / ‖ΔW‖_F of the SVD (the "
        f"dropped singular values), before the factors are cast: mean "
        f"{sum(errors) / len(errors):.4g}, largest {worst.relative_error:.4g} "
        f"({quote.code(worst.name)}).",
        "",
        "| module | rank | relative error |",
        "|---|---:|---:|",
        *(
            f"| {quote.code(m.name, table=True)} | {m.rank} | {m.relative_error:.4g} |"
            for m in result.modules
        ),
    ]
    if plan.saved:
        lines += ["", "## Stored whole (`modules_to_save`)", ""]
        lines += [f"- {quote.code(n)}" for n in plan.saved]
    lines += ["", "## Not in the adapter", ""]
    if result.differing:
        shown = result.differing[:LEFT_OUT_ROWS]
        lines += [
            f"{len(result.differing)} tensor(s) differ between fine-tune and base but are not in "
            "the adapter (norms, biases, embeddings unless asked for): loading the adapter on the "
            "base keeps the base's. Relative difference ‖W_fine-tune − W_base‖_F / ‖W_base‖_F"
            + (f", the {len(shown)} largest" if len(shown) < len(result.differing) else "")
            + ":",
            "",
            "| tensor | relative difference |",
            "|---|---:|",
            *(f"| {quote.code(n, table=True)} | {d:.4g} |" for n, d in shown),
        ]
    else:
        lines.append("Every other tensor is the same in fine-tune and base.")
    install = install_instructions(constants.ENDPOINT)["command"]
    lines += [
        "",
        "## Reproduce",
        "",
        quote.code_block(
            "\n".join(filter(None, [install, command or reproduce_command(plan)])), "bash"
        ),
    ]
    return adapter_card("\n".join(lines), base_hub_id, ["mergebot", "extracted-lora"])
