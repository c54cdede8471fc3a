"""Scale-out on PostgreSQL: two worker processes share one queue; ten jobs, each merged
exactly once, the load shared between them."""

from __future__ import annotations

import pytest
from postgres_server import postgres_url
from service_env import (
    MergebotProcess,
    job_commits,
    service_env,
    start_sandbox,
    start_serve,
    ties_recipe,
)

pytestmark = pytest.mark.slow

ALICE = "tok-alice"
JOBS = 10


def test_two_workers_share_ten_jobs_each_merged_once(llama_family, tmp_path):
    sandbox = start_sandbox({"alice": llama_family})
    processes: list[MergebotProcess] = []
    with postgres_url() as database:
        settings = {"MERGEBOT_DATABASE_URL": database, "MERGEBOT_MAX_QUEUED": str(JOBS)}
        try:
            serve, api = start_serve(sandbox.url, tmp_path / "api", "--no-worker", **settings)
            processes.append(serve)
            for name in ("pg-worker-1", "pg-worker-2"):
                env = service_env(sandbox.url, tmp_path / name, **settings)
                processes.append(
                    MergebotProcess(["worker", "--id", name], env, tmp_path / f"{name}.log")
                )
            submitted = [
                api.submit(ties_recipe("alice"), f"alice/shared-{i}", ALICE)[1] for i in range(JOBS)
            ]
            assert len({job["id"] for job in submitted}) == JOBS
            done = [api.wait_done(job["id"]) for job in submitted]
            assert all(job["status"] == "succeeded" for job in done), done
            assert all(job["merge_runs"] == 1 for job in done)
            workers = [job["worker"] for job in done]
            assert set(workers) == {"pg-worker-1", "pg-worker-2"}, workers

            for job in done:
                assert len(job_commits(sandbox.url, job["target"], ALICE, job["id"])) == 1
        finally:
            for process in processes:
                process.stop()
            sandbox.__exit__()
