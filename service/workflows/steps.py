"""What every step of a job's workflow needs, a merge's and a search's alike: the process's job
service, the job and its requester's token, Hub calls that ride out an outage (each retry a
line in the job's log), the merged output on this machine's disk, the card's credit line, and
the exception a cancel raises at the next checkpoint.

The job service is the intake's (:class:`service.intake.jobs.JobService`), which queues the
workflows; the worker hands it over with :func:`configure` before DBOS launches, so the steps
use it without importing the submit path. :class:`Jobs` names what they use of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from merge_engine.errors import MergeError
from service.hub_client.retry import RetryPolicy, with_retries
from service.settings import Settings
from service.workflows.job_store import Job, JobStore
from service.workflows.replies import discussion_url, parse_discussion_key
from service.workflows.token_vault import TokenVault

PROGRESS_EVERY = 0.5  # seconds between progress writes (and cancel checks) during a merge
T = TypeVar("T")


class Following(Protocol):
    def record(self, job: Job, token: str | None) -> None:
        """Follow ``job``'s sources from now on (it succeeded, and asked to)."""


class Jobs(Protocol):
    """What the workflows use of the process's job service."""

    settings: Settings
    store: JobStore
    vault: TokenVault
    follows: Following
    helping: threading.Event | None

    @property
    def studies(self) -> Any:
        """Optuna's storage of the search studies."""

    def check_disk(self, needed: int, whose: str) -> None:
        """Refuse a job of ``needed`` bytes that does not fit the work dir's disk now."""

    def finish(self, job_id: str, keep_token: bool = False) -> None:
        """Remove what ends with every job: its work directory and (unless kept) its token."""


_service: Jobs | None = None


class JobCancelled(Exception):
    """The requester cancelled the job; it stops at the next checkpoint."""


def configure(service: Jobs) -> None:
    """Give the workflow this process's job service (before DBOS launches and recovers)."""
    global _service
    _service = service


def running_service() -> Jobs:
    if _service is None:
        raise RuntimeError("service.workflows.steps.configure() was not called in this process")
    return _service


def stage_done(stage: str, seconds: float) -> str:
    """The log line of a finished stage, which the job's summary reads its time from."""
    return f"{stage}: done in {seconds:.1f} s"


def job_of(job_id: str) -> Job:
    job = running_service().store.get(job_id)
    if job is None:
        raise MergeError(f"job {job_id} is no longer in the job table; submit it again")
    return job


def read_token(job: Job) -> str | bool:
    """Sources are read with the requester's token or anonymously, never with the bot's."""
    return running_service().vault.get(job.id) or False


def hub_policy() -> RetryPolicy:
    return RetryPolicy(patience=running_service().settings.hub_patience_seconds)


def log_line(job_id: str) -> Callable[[str], None]:
    """Where a Hub step's retries are told: a line each in the job's log."""
    store = running_service().store
    return lambda line: store.update(job_id, log=line)


def with_hub(job_id: str, call: Callable[[], T]) -> T:
    """Run a step's Hub calls, riding out an outage; each retry is a line in the job's log."""
    return with_retries(call, hub_policy(), on_retry=log_line(job_id))


def output_dir(service: Jobs, job: Job) -> Path:
    """Where a search's winner is written: a folder named after the target, as the card is."""
    return service.settings.job_dir(job.id) / "search" / job.target.split("/")[1]


def merged_dir(job: Job) -> Path:
    if job.kind == "search":
        return output_dir(running_service(), job)
    return running_service().settings.job_dir(job.id) / "merged"


def merged_output(job: Job) -> Path:
    """The merge step's output, which later steps need on this machine's disk."""
    folder = merged_dir(job)
    if not folder.is_dir():
        raise MergeError(
            f"the merged files of job {job.id} are gone from this worker's disk (restarted on another machine?); submit the job again"
        )
    return folder


def credit(job: Job) -> str:
    if job.discussion is None:
        return f"Requested by {job.requester}."
    url = discussion_url(running_service().settings.endpoint, job.discussion)
    _, _, num = parse_discussion_key(job.discussion)
    return f"Requested by @{job.requester} in [discussion #{num}]({url})."
