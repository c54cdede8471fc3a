"""The per-requester queue limit holds when one requester submits many jobs at the same moment
from several processes, in SQLite and in PostgreSQL alike."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from postgres_server import postgres_url

from service.job_store import Job, JobStore, make_engine

SUBMITS, LIMIT = 20, 3


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/jobs.sqlite"
        return
    with postgres_url() as url:
        yield url


def job(number: int) -> Job:
    return Job(
        id=f"job-{number}",
        attempt=1,
        requester="alice",
        origin="api",
        target=f"alice/merge-{number}",
        private=False,
        follow_sources=False,
        recipe="merge_method: linear",
        sources={},
    )


def test_simultaneous_submits_of_one_requester_never_pass_the_limit(database_url):
    stores = [JobStore(make_engine(database_url)) for _ in range(SUBMITS)]  # one per "process"
    start = threading.Barrier(SUBMITS)

    def submit(number: int) -> Job | None:
        start.wait()
        return stores[number].add_within_limit(job(number), LIMIT)

    with ThreadPoolExecutor(SUBMITS) as pool:
        accepted = [found for found in pool.map(submit, range(SUBMITS)) if found is not None]
    assert len(accepted) == LIMIT
    queued = stores[0].list("alice", limit=100)
    assert sorted(j.id for j in queued) == sorted(j.id for j in accepted)
    # another requester has a queue of their own
    other = job(99)
    other.requester = "bob"
    assert stores[0].add_within_limit(other, LIMIT) is other
