"""The card of an adapter output: which adapters were combined, how (PEFT's combination type
and its arguments), with which weights, on which base, and how to load and reproduce it; its
front matter is the PEFT adapter's (:func:`merge_engine.output.peft_adapter.adapter_card`)."""

from __future__ import annotations

from importlib.resources import files

import jinja2
from huggingface_hub import constants

from merge_engine.methods.adapter_combination import (
    DENSITY_TYPES,
    DESCRIPTIONS,
    RANDOM_TYPES,
    SIGN_TYPES,
    SVD_TYPES,
)
from merge_engine.output.card import _hub_link, install_instructions, mergebot_version, tidy
from merge_engine.output.peft_adapter import adapter_card
from merge_engine.plan.adapter_plan import AdapterPlan
from merge_engine.recipe import quote

TEMPLATE = files("merge_engine.output") / "templates" / "adapter_card.md"
DEFAULT_COMMAND = "mergebot merge mergebot_recipe.yaml ./adapter"


def parameter_rows(plan: AdapterPlan) -> list[dict[str, str]]:
    """The arguments of ``add_weighted_adapter`` that the combination type reads."""
    combination = plan.combination
    rows = []
    if combination.type in DENSITY_TYPES:
        rows.append(("density", combination.density))
    if combination.type in SIGN_TYPES:
        rows.append(("majority_sign_method", combination.majority_sign_method))
    if combination.type in SVD_TYPES:
        rows.append(("svd_rank", combination.svd_rank or f"{plan.rank} (the largest adapter rank)"))
        rows.append(
            ("svd_clamp", "none" if combination.svd_clamp is None else combination.svd_clamp)
        )
        rows.append(("svd_full_matrices", str(combination.svd_full_matrices).lower()))
    if combination.type in RANDOM_TYPES:
        rows.append(("random_seed", f"{plan.seed} (torch.manual_seed before PEFT's call)"))
    return [{"name": name, "value": quote.cell(value)} for name, value in rows]


def build_adapter_card(
    plan: AdapterPlan,
    name: str | None = None,
    command: str | None = None,
    job_id: str | None = None,
    credit: str | None = None,
    endpoint: str | None = None,
    repo_id: str | None = None,
    changes: list[str] | None = None,
) -> str:
    """The whole ``README.md`` of an adapter output, front matter included; ``repo_id`` is
    where it will be pushed (the loading example names it), ``endpoint`` the Hub the sources
    came from (``HF_ENDPOINT`` when not given), ``job_id`` the service job that made it,
    ``credit`` who asked, ``changes`` what moved since the last merge of a followed recipe."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    install = install_instructions(endpoint)
    base = plan.base.ref
    adapters = [
        {
            "link": _hub_link(adapter.ref, adapter.ref.is_local, endpoint),
            "weight": quote.cell(weight),
            "rank": "/".join(str(rank) for rank in adapter.ranks),
            "modules": str(len(adapter.modules)),
            "revision": f"`{adapter.revision}`" if adapter.revision else "local",
        }
        for adapter, weight in zip(plan.adapters, plan.weights, strict=True)
    ]
    base_revision = f" at `{plan.base.revision}`" if plan.base.revision else ""
    usage = "\n".join(
        [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({str(base.path)!r})",
            f"model = PeftModel.from_pretrained(base, {(repo_id or name or './adapter')!r})",
        ]
    )
    body = (
        jinja2.Environment(autoescape=False, keep_trailing_newline=True)
        .from_string(TEMPLATE.read_text(encoding="utf-8"))
        .render(
            name=quote.text(name or "Combined adapter"),
            merged=quote.text(plan.describe_models()),
            version=mergebot_version(),
            usage=quote.code_block(usage, "python"),
            job_id=job_id,
            credit=credit,
            changes=changes or [],
            combination=plan.combination,
            description=DESCRIPTIONS[plan.combination.type],
            rank=plan.rank,
            base=_hub_link(base, base.is_local, endpoint) + base_revision,
            parameters=parameter_rows(plan),
            notes=[quote.text(note) for note in plan.notes],
            adapters=adapters,
            recipe=quote.code_block(plan.reproducible_recipe().to_yaml(), "yaml"),
            install=install,
            reproduce=quote.code_block(
                "\n".join(filter(None, [install["command"], command or DEFAULT_COMMAND])), "bash"
            ),
        )
    )
    tags = ["merge", "mergebot", plan.combination.type]
    return adapter_card(tidy(body), None if base.is_local else base.path, tags)
