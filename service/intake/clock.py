"""The clock: periodic work that only enqueues or tidies idempotently, so running it in more
than one process is harmless (APScheduler's own job store is never shared): poll the watched
repos' discussions, check whether followed sources moved, run once more the jobs a Hub outage
failed when the Hub answers again, and sweep what a crash can leave behind (the work folder and
stored token of a job that has ended).
"""

from __future__ import annotations

import shutil

from apscheduler.schedulers.background import BackgroundScheduler

from service.intake.discussions import DiscussionWatcher
from service.intake.jobs import JobService
from service.workflows.job_store import ACTIVE

SWEEP_MINUTES = 10


def sweep(service: JobService) -> int:
    """Remove the leftovers of ended jobs (folders of the jobs and of the searches this worker
    helped, tokens; a follow's token is not a job's, and stays while it follows); return how
    many folders went."""
    removed = 0
    for kind in ("jobs", "helping"):
        folders = service.settings.work_dir / kind
        for folder in sorted(folders.iterdir()) if folders.is_dir() else []:
            job = service.get(folder.name)
            if job is None or job.status not in ACTIVE:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    service.vault.erase_of_ended_jobs()
    return removed


def tick(service: JobService) -> None:
    """One round of everything the clock does (``mergebot tick`` runs it once)."""
    DiscussionWatcher(service).poll()
    service.follows.check_all()
    service.retry_after_outage()
    sweep(service)


def start_clock(service: JobService) -> BackgroundScheduler:
    settings = service.settings
    clock = BackgroundScheduler(daemon=True)
    clock.add_job(sweep, "interval", args=[service], minutes=SWEEP_MINUTES, id="sweep")
    every = {
        "follows": (service.follows.check_all, settings.follow_check_seconds),
        "outages": (service.retry_after_outage, settings.outage_check_seconds),
    }
    if settings.watch_repos and settings.bot_token:
        every["discussions"] = (DiscussionWatcher(service).poll, settings.discussion_poll_seconds)
    for name, (work, seconds) in every.items():
        clock.add_job(work, "interval", seconds=seconds, id=name, max_instances=1)
    clock.start()
    return clock
