"""Merges long enough to interrupt: a worker killed with SIGKILL in the middle of one, started
again under the same id, finishes the job with the right tensors and exactly one commit; a
merge cancelled while it runs stops at the next tensor and publishes nothing."""

from __future__ import annotations

import pytest
from conftest import TIES_WEIGHTS, load_weights
from huggingface_hub import HfApi
from service_env import (
    MergebotProcess,
    job_commits,
    service_env,
    start_sandbox,
    start_serve,
    ties_recipe,
    wait_until,
)

from merge_engine import merge_models
from merge_engine.example import make_family

pytestmark = pytest.mark.slow

ALICE = "tok-alice"
# Big enough (3 x 120 MB) that the merge takes a couple of seconds on two cores: time to kill it.
SIZE = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=4096,
)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    family = make_family(tmp_path_factory.mktemp("big"), "llama", finetunes=3, **SIZE)
    sandbox = start_sandbox({"alice": family})
    yield family, sandbox
    sandbox.__exit__()


def merge_under_way(api, job_id: str) -> dict:
    return wait_until(
        lambda: (j := api.job(job_id))["stage"] == "merge" and 0 < j["fraction"] < 1 and j,
        "the merge to be under way",
    )


def test_a_killed_worker_resumes_its_merge_and_pushes_once(big, tmp_path):
    family, sandbox = big
    work = tmp_path / "work"
    serve, api = start_serve(sandbox.url, work, "--no-worker")

    def start_worker() -> MergebotProcess:
        env = service_env(sandbox.url, work)
        return MergebotProcess(["worker", "--id", "crash-worker"], env, tmp_path / "worker.log")

    worker = start_worker()
    try:
        _, job = api.submit(ties_recipe("alice"), "alice/survivor", ALICE)
        merging = merge_under_way(api, job["id"])
        worker.kill()
        assert api.job(job["id"])["status"] == "running"
        assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists("alice/survivor")

        worker = start_worker()
        done = api.wait_done(job["id"])
        assert done["status"] == "succeeded", (done, worker.log)
        assert merging["merge_runs"] == 1 and done["merge_runs"] == 2

        assert len(job_commits(sandbox.url, "alice/survivor", ALICE, job["id"])) == 1
        hub = HfApi(endpoint=sandbox.url, token=ALICE)
        hub.snapshot_download("alice/survivor", local_dir=tmp_path / "result")
        base, (a, b, _) = family
        expected = merge_models([a, b], "ties", base=base, model_parameters=TIES_WEIGHTS)
        got = load_weights(tmp_path / "result")
        assert all(got[name].equal(tensor) for name, tensor in expected.items())
        assert not (work / "jobs" / job["id"]).exists()
    finally:
        worker.stop()
        serve.stop()


def test_a_running_merge_stops_when_cancelled_and_publishes_nothing(big, tmp_path):
    _, sandbox = big
    serve, api = start_serve(sandbox.url, tmp_path / "work")
    try:
        _, job = api.submit(ties_recipe("alice"), "alice/cancelled", ALICE)
        merge_under_way(api, job["id"])
        status, _ = api.call("POST", f"/api/jobs/{job['id']}/cancel", {}, ALICE)
        assert status == 200
        done = api.wait_done(job["id"])
        assert done["status"] == "cancelled" and done["fraction"] < 1, done
        assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists("alice/cancelled")
        assert not (tmp_path / "work" / "jobs" / job["id"]).exists()
    finally:
        serve.stop()
