"""Starting DBOS in a process: the queues it serves (merges, and searches in a lane of their
own), the worker id it recovers under.

A worker id must be stable (restart a crashed worker under the same id and it resumes the jobs
it owned) and unique among live processes (two live processes with one id would both run that
id's jobs). ``mergebot serve`` defaults to ``<host>-serve``, ``mergebot worker`` to
``<host>-worker0``; set ``MERGEBOT_WORKER_ID`` (or ``--id``) for every further worker.
"""

from __future__ import annotations

import logging

from service.workflows.steps import Jobs

APP_VERSION = "mergebot-jobs-3"
"""The workflow's version: recovery only resumes workflows of the same version, so bump it
when the steps change and keep it equal across a fleet."""
MERGES_AT_ONCE = 1  # per worker: one merge holds the machine's memory bandwidth (and GPU)
SEARCHES_AT_ONCE = 1
"""Per worker, beside its merge: searches take turns in this lane (see docs/architecture.md)."""


def start_dbos(service: Jobs, run_jobs: bool = True) -> None:
    """Launch DBOS on the service's database; with ``run_jobs`` this process also merges."""
    from dbos import DBOS, DBOSPortableJSONSerializer

    from service.workflows import job_workflow, search_steps, steps

    settings = service.settings
    steps.configure(service)
    DBOS(
        config={
            "name": "mergebot",
            "system_database_url": settings.database_url,
            "executor_id": settings.worker_id,
            "application_version": APP_VERSION,
            "serializer": DBOSPortableJSONSerializer(),  # JSON in the database, never pickle
            "log_level": "WARNING",
        }
    )
    DBOS.listen_queues([job_workflow.QUEUE, job_workflow.SEARCH_QUEUE] if run_jobs else [])
    DBOS.launch()
    DBOS.register_queue(job_workflow.QUEUE, worker_concurrency=MERGES_AT_ONCE)
    DBOS.register_queue(job_workflow.SEARCH_QUEUE, worker_concurrency=SEARCHES_AT_ONCE)
    if run_jobs:  # an idle worker evaluates trials of the searches other workers run
        service.helping = search_steps.start_helping(service)
    logging.getLogger("mergebot.jobs").info(
        "worker %s %s", settings.worker_id, "merging" if run_jobs else "submitting only"
    )


def stop_dbos(service: Jobs | None = None) -> None:
    from dbos import DBOS

    if service is not None and service.helping is not None:
        service.helping.set()
    DBOS.destroy()
