"""A merge's durable steps: pre-flight → download → merge → verify → card → push (the
workflow that runs them is :mod:`service.workflows.job_workflow`; a search shares the push).

Each stage is a DBOS step, checkpointed in the database when it ends; a worker killed in the
middle resumes, under the same worker id, at the first stage that had not finished. Every step
is safe to run twice: downloads land in the job's own folder, the merged folder appears only
complete (the engine renames it into place), and the push first looks for a commit carrying
the job id. Steps pass nothing but the job id between them, so no token ever becomes a
checkpointed input or output.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dbos import DBOS

from merge_engine import preflight
from merge_engine.errors import MergeError
from merge_engine.output.adapter_card import build_adapter_card
from merge_engine.output.card import build_card
from merge_engine.output.lora_file_card import build_lora_file_card
from merge_engine.plan.adapter_plan import AdapterPlan
from merge_engine.plan.kinds import Plan
from merge_engine.plan.lora_file_plan import LoraFilePlan
from merge_engine.recipe.schema import recipe_from_text
from merge_engine.run.adapter_merge import download_adapters, write_adapter_merge
from merge_engine.run.executor import download_plan, resolve_device, write_merge
from merge_engine.run.lora_merge import download_lora_files, write_lora_file_merge
from service.disk import merge_bytes
from service.hub_client.hub import hub_api, publish
from service.verification.verify import verify_output
from service.workflows.job_store import STAGES, Job
from service.workflows.steps import (
    PROGRESS_EVERY,
    JobCancelled,
    credit,
    hub_policy,
    job_of,
    log_line,
    merged_dir,
    merged_output,
    read_token,
    running_service,
    with_hub,
)

_plans: dict[str, Plan] = {}
"""Each running attempt's plan, built once in this process by its first step that needs it
(a workflow resumed in a new process builds it again); it also remembers the downloads."""


def plan_of(job: Job) -> Plan:
    plan = _plans.get(job.workflow_id)
    if plan is None:
        plan = preflight(
            recipe_from_text(job.recipe),
            token=read_token(job),
            hub_only=True,
            cache_dir=running_service().settings.job_dir(job.id) / "hub",
        )
        _plans[job.workflow_id] = plan
    return plan


def forget_plan(job: Job) -> None:
    """The attempt ended: its plan is not needed in this process any more."""
    _plans.pop(job.workflow_id, None)


def _progress(job_id: str) -> Callable[[int, int, str], None]:
    """Write the merge's progress at most every PROGRESS_EVERY seconds and stop on cancel."""
    store = running_service().store
    last = 0.0

    def report(done: int, total: int, name: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_EVERY and done < total:
            return
        last = now
        store.update(job_id, fraction=done / total)
        if store.cancel_requested(job_id):
            raise JobCancelled()

    return report


@DBOS.step(name="mergebot.preflight")
def preflight_step(job_id: str) -> None:
    """The pinned sources are still there and still readable by this requester."""
    job = job_of(job_id)
    with_hub(job_id, lambda: plan_of(job))


@DBOS.step(name="mergebot.download")
def download_step(job_id: str) -> None:
    job = job_of(job_id)
    plan = plan_of(job)
    running_service().check_disk(merge_bytes(plan), "the worker's")
    cache = running_service().settings.job_dir(job_id) / "hub"
    if isinstance(plan, AdapterPlan):  # the adapters only: the base's weights are never read
        with_hub(job_id, lambda: download_adapters(plan, read_token(job), cache))
    elif isinstance(plan, LoraFilePlan):  # the LoRA files only, likewise
        with_hub(job_id, lambda: download_lora_files(plan, read_token(job), cache))
    else:
        with_hub(job_id, lambda: download_plan(plan, read_token(job), cache))


@DBOS.step(name="mergebot.merge")
def merge_step(job_id: str) -> None:
    jobs = running_service()
    job = job_of(job_id)
    jobs.store.count_merge_run(job_id, jobs.settings.worker_id)
    out = merged_dir(job)
    if out.exists():  # finished before a crash: the engine renames it into place complete
        return
    plan = plan_of(job)
    options = dict(
        token=read_token(job),
        show_progress=False,
        progress=_progress(job_id),
        cache_dir=jobs.settings.job_dir(job_id) / "hub",
    )
    if isinstance(plan, AdapterPlan):
        write_adapter_merge(plan, out, **options)
    elif isinstance(plan, LoraFilePlan):
        write_lora_file_merge(plan, out, **options)
    else:
        write_merge(
            plan,
            out,
            device=jobs.settings.device,
            stats_dir=jobs.settings.job_dir(job_id) / "statistics",
            **options,
        )


@DBOS.step(name="mergebot.verify")
def verify_step(job_id: str) -> None:
    verify_output(merged_output(job_of(job_id)), resolve_device(running_service().settings.device))


@DBOS.step(name="mergebot.card")
def card_step(job_id: str) -> None:
    job = job_of(job_id)
    plan = plan_of(job)
    name = job.target.split("/")[1]
    command = f"mergebot merge mergebot_recipe.yaml ./{name}"
    endpoint = running_service().settings.endpoint
    if isinstance(plan, AdapterPlan | LoraFilePlan):
        build = build_adapter_card if isinstance(plan, AdapterPlan) else build_lora_file_card
        text = build(
            plan, name, command, job.id, credit(job), endpoint, job.target, changes=job.changes
        )
        (merged_output(job) / "README.md").write_text(text, encoding="utf-8")
    else:
        card = build_card(
            plan, name, command, job.id, credit(job), changes=job.changes, endpoint=endpoint
        )
        card.save(merged_output(job) / "README.md")
        text = card.text
    running_service().store.update(job_id, card=text)


@DBOS.step(name="mergebot.push")
def push_step(job_id: str) -> None:
    jobs = running_service()
    job = job_of(job_id)
    token = jobs.vault.get(job_id) or _bot_token_for(job)
    api = hub_api(jobs.settings.endpoint, token)
    commit = publish(
        api,
        merged_output(job),
        job.target,
        job.id,
        private=job.private,
        title=_commit_title(job),
        policy=hub_policy(),
        on_retry=log_line(job_id),
    )
    weights = sum(f.stat().st_size for f in merged_output(job).glob("*.safetensors"))
    jobs.store.update(
        job_id, commit=commit, url=f"{jobs.settings.endpoint}/{job.target}", output_bytes=weights
    )


def _commit_title(job: Job) -> str:
    if job.kind == "search":
        return "Evolutionary merge with mergebot"
    return f"Merge with mergebot ({recipe_from_text(job.recipe).merge_method})"


def _bot_token_for(job: Job) -> str:
    """The bot's token, which writes only to the bot's namespace."""
    settings = running_service().settings
    if not settings.bot_token or job.target.split("/")[0] != settings.bot_namespace:
        raise MergeError(
            f"no token may push to {job.target}: the requester's token is gone and the bot writes only to {settings.bot_namespace}/...; submit the job again while signed in"
        )
    return settings.bot_token


STEPS: list[tuple[str, Callable[[str], None]]] = list(
    zip(
        STAGES,
        [preflight_step, download_step, merge_step, verify_step, card_step, push_step],
        strict=True,
    )
)
