"""The clock: periodic work that only enqueues or tidies idempotently, so running it in more
than one process is harmless (APScheduler's own job store is never shared).

For now it sweeps what a crash can leave behind: the work folder and the stored token of a
job that has ended (a worker killed after the job's last step but before its clean-up).
"""

from __future__ import annotations

import shutil

from apscheduler.schedulers.background import BackgroundScheduler

from service.job_store import ACTIVE
from service.jobs import JobService

SWEEP_MINUTES = 10


def sweep(service: JobService) -> int:
    """Remove the leftovers of ended jobs; return how many job folders went."""
    jobs_dir = service.settings.work_dir / "jobs"
    removed = 0
    for folder in sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []:
        job = service.get(folder.name)
        if job is None or job.status not in ACTIVE:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    service.vault.keep_only(service.store.active_ids())
    return removed


def start_clock(service: JobService) -> BackgroundScheduler:
    clock = BackgroundScheduler(daemon=True)
    clock.add_job(sweep, "interval", args=[service], minutes=SWEEP_MINUTES, id="sweep")
    clock.start()
    return clock
