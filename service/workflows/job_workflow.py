"""The durable job workflow: pre-flight → download → merge → verify → card → push for a merge
(a search's steps are in :mod:`service.workflows.search_steps`).

Each stage is a DBOS step, checkpointed in the database when it ends; a worker killed in the
middle resumes, under the same worker id, at the first stage that had not finished. Every step
is safe to run twice: downloads land in the job's own folder, the merged folder appears only
complete (the engine renames it into place), and the push first looks for a commit carrying
the job id. Steps pass nothing but the job id between them, so no token ever becomes a
checkpointed input or output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dbos import DBOS, SetWorkflowID
from huggingface_hub.errors import HfHubHTTPError

from merge_engine import preflight
from merge_engine.card import build_card
from merge_engine.errors import MergeError, excerpt
from merge_engine.hub_failures import answered
from merge_engine.plan import MergePlan
from merge_engine.recipe import recipe_from_text
from merge_engine.run import download_plan, resolve_device, write_merge
from service.disk import is_disk_full, merge_bytes
from service.hub_client.hub import hub_api, publish
from service.hub_client.retry import HubOutage, RetryPolicy, is_transient, with_retries
from service.intake.discussions import DiscussionWatcher, discussion_url, parse_discussion_key
from service.intake.jobs import JobService
from service.verification.verify import verify_output
from service.workflows.job_store import ACTIVE, SEARCH_STAGES, STAGES, Job

QUEUE = "merges"
SEARCH_QUEUE = "searches"
"""Searches have a lane of their own on every worker: a merge never waits behind one."""
WORKFLOW = "mergebot.merge_job"
PROGRESS_EVERY = 0.5  # seconds between progress writes (and cancel checks) during a merge
log = logging.getLogger("mergebot.jobs")
T = TypeVar("T")

_service: JobService | None = None


class JobCancelled(Exception):
    """The requester cancelled the job; it stops at the next checkpoint."""


def configure(service: JobService) -> None:
    """Give the workflow this process's job service (before DBOS launches and recovers)."""
    global _service
    _service = service


def running_service() -> JobService:
    if _service is None:
        raise RuntimeError(
            "service.workflows.job_workflow.configure() was not called in this process"
        )
    return _service


def stage_done(stage: str, seconds: float) -> str:
    """The log line of a finished stage, which the job's summary reads its time from."""
    return f"{stage}: done in {seconds:.1f} s"


def enqueue(job: Job, turn: int = 0) -> None:
    """Queue ``job``'s workflow (a search's ``turn`` after the first continues its search)."""
    queue = SEARCH_QUEUE if job.kind == "search" else QUEUE
    with SetWorkflowID(turn_workflow_id(job, turn)):
        DBOS.enqueue_workflow(queue, merge_job, job.id, turn)


def turn_workflow_id(job: Job, turn: int) -> str:
    """The workflow of one turn of ``job``'s current attempt: the attempt's own for the first."""
    return job.workflow_id if turn == 0 else f"{job.workflow_id}.turn{turn}"


# --- what every step needs -----------------------------------------------------------------


def job_of(job_id: str) -> Job:
    job = running_service().store.get(job_id)
    if job is None:
        raise MergeError(f"job {job_id} is no longer in the job table; submit it again")
    return job


def read_token(job: Job) -> str | bool:
    """Sources are read with the requester's token or anonymously, never with the bot's."""
    return running_service().vault.get(job.id) or False


_plans: dict[str, MergePlan] = {}
"""Each running attempt's plan, built once in this process by its first step that needs it
(a workflow resumed in a new process builds it again); it also remembers the downloads."""


def _plan(job: Job) -> MergePlan:
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


def _hub_policy() -> RetryPolicy:
    return RetryPolicy(patience=running_service().settings.hub_patience_seconds)


def _log_line(job_id: str) -> Callable[[str], None]:
    """Where a Hub step's retries are told: a line each in the job's log."""
    store = running_service().store
    return lambda line: store.update(job_id, log=line)


def with_hub(job_id: str, call: Callable[[], T]) -> T:
    """Run a step's Hub calls, riding out an outage; each retry is a line in the job's log."""
    return with_retries(call, _hub_policy(), on_retry=_log_line(job_id))


def _merged_dir(job: Job) -> Path:
    if job.kind == "search":
        from service.workflows.search_steps import output_dir

        return output_dir(running_service(), job)
    return running_service().settings.job_dir(job.id) / "merged"


def merged_output(job: Job) -> Path:
    """The merge step's output, which later steps need on this machine's disk."""
    folder = _merged_dir(job)
    if not folder.is_dir():
        raise MergeError(
            f"the merged files of job {job.id} are gone from this worker's disk (restarted on another machine?); submit the job again"
        )
    return folder


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


# --- the steps -----------------------------------------------------------------------------


@DBOS.step(name="mergebot.preflight")
def preflight_step(job_id: str) -> None:
    """The pinned sources are still there and still readable by this requester."""
    job = job_of(job_id)
    with_hub(job_id, lambda: _plan(job))


@DBOS.step(name="mergebot.download")
def download_step(job_id: str) -> None:
    job = job_of(job_id)
    plan = _plan(job)
    running_service().check_disk(merge_bytes(plan), "the worker's")
    cache = running_service().settings.job_dir(job_id) / "hub"
    with_hub(job_id, lambda: download_plan(plan, read_token(job), cache))


@DBOS.step(name="mergebot.merge")
def merge_step(job_id: str) -> None:
    jobs = running_service()
    job = job_of(job_id)
    jobs.store.count_merge_run(job_id, jobs.settings.worker_id)
    out = _merged_dir(job)
    if out.exists():  # finished before a crash: the engine renames it into place complete
        return
    write_merge(
        _plan(job),
        out,
        device=jobs.settings.device,
        token=read_token(job),
        show_progress=False,
        progress=_progress(job_id),
        cache_dir=jobs.settings.job_dir(job_id) / "hub",
        stats_dir=jobs.settings.job_dir(job_id) / "statistics",
    )


@DBOS.step(name="mergebot.verify")
def verify_step(job_id: str) -> None:
    verify_output(merged_output(job_of(job_id)), resolve_device(running_service().settings.device))


@DBOS.step(name="mergebot.card")
def card_step(job_id: str) -> None:
    job = job_of(job_id)
    card = build_card(
        _plan(job),
        name=job.target.split("/")[1],
        command=f"mergebot merge mergebot_recipe.yaml ./{job.target.split('/')[1]}",
        job_id=job.id,
        credit=credit(job),
        changes=job.changes,
        endpoint=running_service().settings.endpoint,
    )
    card.save(merged_output(job) / "README.md")
    running_service().store.update(job_id, card=card.text)


def credit(job: Job) -> str:
    if job.discussion is None:
        return f"Requested by {job.requester}."
    url = discussion_url(running_service().settings.endpoint, job.discussion)
    _, _, num = parse_discussion_key(job.discussion)
    return f"Requested by @{job.requester} in [discussion #{num}]({url})."


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
        policy=_hub_policy(),
        on_retry=_log_line(job_id),
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


def _steps(job: Job) -> list[tuple[str, Callable[[str], None]]]:
    if job.kind != "search":
        return STEPS
    from service import search_steps as s

    steps = [s.search_preflight_step, s.search_step, s.search_verify_step, push_step]
    return list(zip(SEARCH_STAGES, steps, strict=True))


# --- the workflow --------------------------------------------------------------------------


@DBOS.workflow(name=WORKFLOW)
def merge_job(job_id: str, turn: int = 0) -> str:
    """Run every stage of ``job_id``; record how it ended. Returns the final status. A search
    whose turn ends while another search waits queues its next ``turn`` (which continues at
    the search stage) and returns "waiting"."""
    jobs = running_service()
    store = jobs.store
    job = store.get(job_id)
    if job is None or job.status not in ACTIVE:
        if job is not None and turn:  # cancelled between turns: what the last one left here
            jobs.finish(job_id)
        return job.status if job else "missing"
    if turn_workflow_id(job, turn) != DBOS.workflow_id:
        return "superseded"  # a later attempt of the same job owns the row now
    store.update(job_id, status="running", worker=jobs.settings.worker_id)
    stage = "pre-flight"
    retry_later = False  # failed by a Hub outage, and to run again when the Hub is back
    steps = _steps(job)
    if turn:
        steps = steps[job.stages.index("search") :]
    try:
        for stage, step in steps:
            if store.cancel_requested(job_id):
                raise JobCancelled()
            if stage == "search" and turn:
                store.update(job_id, log=f"search: turn {turn + 1}")
            else:
                store.update(job_id, stage=stage, fraction=0.0, log=stage)
            log.info("job %s: %s", job_id, stage)
            started = time.monotonic()
            if step(job_id) is True:  # a search gave its turn away
                store.update(
                    job_id,
                    status="queued",
                    log="search: waits for its next turn (another search waited)",
                )
                enqueue(job, turn + 1)
                return "waiting"
            if stage != "search":  # the search step logs its wall time, which its card states
                store.update(job_id, log=stage_done(stage, time.monotonic() - started))
        done = job_of(job_id)
        if done.follow_sources:
            jobs.follows.record(done, jobs.vault.get(job_id))
        outcome = dict(status="succeeded", stage="done", fraction=1.0, log=f"published {done.url}")
    except JobCancelled:
        outcome = dict(status="cancelled", stage="cancelled", log="cancelled")
    except Exception as error:  # noqa: BLE001  (every failure ends the job with a sentence)
        outage = is_transient(error)
        retry_later = outage and not job.auto_retried
        message = describe_failure(error, stage, job.target, retry_later)
        log.warning("job %s failed at %s: %s", job_id, stage, message)
        outcome = dict(status="failed", error=message, log=f"failed: {message}")
        if outage:
            outcome["failure"] = "hub_outage"
    _plans.pop(job.workflow_id, None)
    # before the status: whoever sees the job ended sees it cleaned up; a job that will run
    # again when the Hub is back keeps its requester's token until then
    jobs.finish(job_id, keep_token=retry_later)
    store.update(job_id, **outcome)
    if job.discussion:
        _report_to_discussion(job_id)
    return outcome["status"]


def _report_to_discussion(job_id: str) -> None:
    try:
        DiscussionWatcher(running_service()).report(job_of(job_id))
    except Exception as error:  # noqa: BLE001  (the merge is done; a lost reply must not undo it)
        log.warning("job %s: could not reply to its discussion (%s)", job_id, type(error).__name__)


def describe_failure(
    error: BaseException, stage: str, target: str, retry_later: bool = False
) -> str:
    """One sentence naming what went wrong and what to do."""
    if is_disk_full(error):
        return f"the worker's disk is full ({type(error).__name__} during {stage}); this job's files were removed and other jobs carry on; submit it again later"
    if is_transient(error):
        outage = error if isinstance(error, HubOutage) else HubOutage(0, error)
        then = (
            "the job runs again by itself once the Hub answers"
            if retry_later
            else "submit the job again when the Hub is back"
        )
        return f"{outage} during {stage}; {then}"
    if isinstance(error, MergeError):
        return str(error)
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if stage == "push" and status == 401:
            return f"the Hub did not accept the token that pushes to {target} (401 Unauthorized); sign in again and submit the job again"
        if stage == "push" and status in (403, 404):
            return f"the Hub refused to let this job create or write {target} ({status}); push to a namespace you can write to"
        return answered(status, f"what the job needs during {stage}")
    return f"the job stopped at {stage} on an unexpected {type(error).__name__} ({excerpt(str(error), 200)}); submitting it again will not help: report it to the bot's operator with the job id"
