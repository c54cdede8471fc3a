"""A job's durable workflow (DBOS) and its queues: the workflow runs a merge's steps
(:mod:`service.workflows.merge_steps`) or a search's (:mod:`service.workflows.search_steps`)
in order, records how the job ended, tells its discussion, and queues a search's next turn when
it gives its lane away. The intake queues a job with :func:`enqueue`.

The workflow and its steps are registered under fixed names (``mergebot.merge_job``,
``mergebot.preflight`` …), not under their module's path: a job queued before a module moved
is still found by the workers after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dbos import DBOS, SetWorkflowID
from huggingface_hub.errors import HfHubHTTPError

from merge_engine.errors import MergeError, excerpt
from merge_engine.sources.hub_failures import answered
from service.disk import is_disk_full
from service.hub_client.retry import HubOutage, is_transient
from service.workflows import merge_steps, search_steps
from service.workflows.job_store import ACTIVE, SEARCH_STAGES, Job
from service.workflows.replies import report
from service.workflows.steps import JobCancelled, job_of, running_service, stage_done

QUEUE = "merges"
SEARCH_QUEUE = "searches"
"""Searches have a lane of their own on every worker: a merge never waits behind one."""
WORKFLOW = "mergebot.merge_job"
log = logging.getLogger("mergebot.jobs")


def enqueue(job: Job, turn: int = 0) -> None:
    """Queue ``job``'s workflow (a search's ``turn`` after the first continues its search)."""
    queue = SEARCH_QUEUE if job.kind == "search" else QUEUE
    with SetWorkflowID(turn_workflow_id(job, turn)):
        DBOS.enqueue_workflow(queue, merge_job, job.id, turn)


def turn_workflow_id(job: Job, turn: int) -> str:
    """The workflow of one turn of ``job``'s current attempt: the attempt's own for the first."""
    return job.workflow_id if turn == 0 else f"{job.workflow_id}.turn{turn}"


def _steps(job: Job) -> list[tuple[str, Callable[[str], None]]]:
    if job.kind != "search":
        return merge_steps.STEPS
    steps = [
        search_steps.search_preflight_step,
        search_steps.search_step,
        search_steps.search_verify_step,
        merge_steps.push_step,
    ]
    return list(zip(SEARCH_STAGES, steps, strict=True))


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
    merge_steps.forget_plan(job)
    # before the status: whoever sees the job ended sees it cleaned up; a job that will run
    # again when the Hub is back keeps its requester's token until then
    jobs.finish(job_id, keep_token=retry_later)
    store.update(job_id, **outcome)
    if job.discussion:
        _report_to_discussion(job_id)
    return outcome["status"]


def _report_to_discussion(job_id: str) -> None:
    try:
        jobs = running_service()
        report(jobs.settings, jobs.store, job_of(job_id))
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
