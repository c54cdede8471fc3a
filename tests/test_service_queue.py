"""Jobs waiting for a worker: the per-requester limit, cancel, and a standalone
``mergebot worker`` that picks up what ``mergebot serve --no-worker`` queued."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi
from service_env import (
    MergebotProcess,
    service_env,
    start_sandbox,
    start_serve,
    ties_recipe,
)

pytestmark = pytest.mark.slow

ALICE, BOB = "tok-alice", "tok-bob"


def test_queued_jobs_limit_cancel_and_a_standalone_worker(llama_family, tmp_path):
    sandbox = start_sandbox({"alice": llama_family})
    work = tmp_path / "work"
    serve, api = start_serve(sandbox.url, work, "--no-worker", MERGEBOT_MAX_QUEUED="2")
    worker = None
    try:
        first = api.submit(ties_recipe("alice"), "alice/first", ALICE)[1]
        second = api.submit(ties_recipe("alice"), "alice/second", ALICE)[1]
        assert first["status"] == second["status"] == "queued"
        status, error = api.submit(ties_recipe("alice"), "alice/third", ALICE)
        assert status == 429 and "alice already has 2 jobs" in error["error"]

        status, error = api.call("POST", f"/api/jobs/{first['id']}/cancel", {}, BOB)
        assert status == 403 and "only alice can cancel" in error["error"]
        status, cancelled = api.call("POST", f"/api/jobs/{first['id']}/cancel", {}, ALICE)
        assert status == 200 and cancelled["status"] == "cancelled"
        status, third = api.submit(ties_recipe("alice"), "alice/third", ALICE)
        assert status == 202, third

        worker = MergebotProcess(
            ["worker", "--id", "test-worker"],
            service_env(sandbox.url, work),
            tmp_path / "worker.log",
        )
        for job in (second, third):
            done = api.wait_done(job["id"])
            assert done["status"] == "succeeded" and done["worker"] == "test-worker", done
        first = api.job(first["id"])
        assert first["status"] == "cancelled" and first["merge_runs"] == 0
        assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists("alice/first")
    finally:
        if worker:
            worker.stop()
        serve.stop()
        sandbox.__exit__()
