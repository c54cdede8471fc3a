"""The per-requester queue limit and the daily search limits hold when one requester submits
many jobs at the same moment from several processes, in SQLite and in PostgreSQL alike."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from postgres_server import postgres_url

from merge_engine.errors import RecipeError
from merge_engine.evolve.spec import spec_from_text
from service.intake.request import check_daily_search_limits
from service.settings import SearchLimits, SearchUse
from service.workflows.job_store import Job, JobStore, make_engine

SUBMITS, LIMIT = 20, 3
SEARCH_TRIALS, DAILY_TRIALS = 60, 1000


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/jobs.sqlite"
        return
    with postgres_url() as url:
        yield url


def job(number: int, **fields) -> Job:
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
        **fields,
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


def test_simultaneous_searches_of_one_requester_never_book_more_than_the_daily_trials(
    database_url,
):
    """The issue's case: 20 searches of 60 trials at once against a limit of 1,000 a day
    booked 1,200 when the daily limit was checked outside the queueing transaction."""
    spec = spec_from_text(
        f"""space: parameters
models: [{{model: alice/math}}, {{model: alice/code}}]
fitness: [{{kind: nll, data: {{examples: [abc]}}}}]
budget: {{trials: {SEARCH_TRIALS}, wall_time: 60}}
"""
    )
    limits = SearchLimits(daily_trials=DAILY_TRIALS)
    stores = [JobStore(make_engine(database_url)) for _ in range(SUBMITS)]
    start = threading.Barrier(SUBMITS)

    def check_day(earlier: SearchUse) -> None:
        check_daily_search_limits(spec, earlier, "alice", limits)

    def submit(number: int) -> Job | str | None:
        search = job(number, kind="search", trials_booked=SEARCH_TRIALS, seconds_booked=60.0)
        start.wait()
        try:
            return stores[number].add_within_limit(search, SUBMITS, check_day)
        except RecipeError as refusal:
            return str(refusal)

    with ThreadPoolExecutor(SUBMITS) as pool:
        outcomes = list(pool.map(submit, range(SUBMITS)))
    accepted = [o for o in outcomes if isinstance(o, Job)]
    assert len(accepted) == DAILY_TRIALS // SEARCH_TRIALS == 16
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(refused) == SUBMITS - 16
    assert all("alice would run 1020 search trials today, more than the 1000" in r for r in refused)
    booked = stores[0].searches_of_day("alice", other_than="")
    assert booked.trials == 16 * SEARCH_TRIALS <= DAILY_TRIALS
