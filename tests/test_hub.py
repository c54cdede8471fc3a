"""Publishing merges to the Hub: one commit per job, created at push time, retried only when
retrying can help. Against the sandbox hub, with the real client."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from service.hub_client.hub import find_job_commit, publish
from service.hub_client.retry import HubOutage, RetryPolicy, with_retries
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

FAST = RetryPolicy(patience=30.0, first_delay=0.0)


@pytest.fixture
def hub():
    with SandboxServer(SandboxHub(HubStore(), users={"tok": "alice"})) as server:
        server.api = HfApi(endpoint=server.url, token="tok")
        yield server


@pytest.fixture
def merged(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text(
        "---\nbase_model: [org/a, org/b]\nbase_model_relation: merge\n---\n# card\n"
    )
    return folder


def test_publish_creates_the_repo_and_pushes_once_per_job(hub, merged):
    assert not hub.api.repo_exists("alice/merge")
    first = publish(
        hub.api, merged, "alice/merge", "job-1", private=True, title="Merge", policy=FAST
    )
    again = publish(
        hub.api, merged, "alice/merge", "job-1", private=True, title="Merge", policy=FAST
    )
    assert first == again == find_job_commit(hub.api, "alice/merge", "job-1")
    commits = hub.api.list_repo_commits("alice/merge")
    assert [c.title for c in commits] == ["Merge", "initial commit"]
    assert sorted(hub.api.list_repo_files("alice/merge")) == ["README.md", "model.safetensors"]
    assert hub.api.model_info("alice/merge").private


def test_a_card_with_a_local_base_model_is_refused_by_the_hub(hub, merged):
    (merged / "README.md").write_text("---\nbase_model: /home/me/model\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        publish(hub.api, merged, "alice/merge", "job-2", private=False, title="Merge", policy=FAST)


def test_a_500_during_the_push_is_retried_and_the_job_lands_once(hub, merged):
    hub.hub.fail("POST", r"/commit/", 500, times=2)
    oid = publish(
        hub.api, merged, "alice/merge", "job-3", private=False, title="Merge", policy=FAST
    )
    assert [c.commit_id for c in hub.api.list_repo_commits("alice/merge")][0] == oid
    assert len(hub.api.list_repo_commits("alice/merge")) == 2


def test_permanent_errors_fail_at_once(hub, merged):
    hub.hub.fail("POST", r"/api/repos/create", 401, times=10)
    calls = []
    with pytest.raises(HfHubHTTPError):
        with_retries(lambda: calls.append(1) or hub.api.create_repo("alice/x"), FAST)
    assert len(calls) == 1


def test_retry_policy_backs_off_within_its_patience(hub):
    policy = RetryPolicy(patience=10.0, first_delay=1.0, max_delay=5.0)
    hub.hub.fail("GET", r"/api/models/", 503, times=1)
    with pytest.raises(HfHubHTTPError) as unavailable:
        hub.api.model_info("alice/anything")
    error = unavailable.value
    assert [policy.delay(error, n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert policy.delay(error, 4, waited=8.0) == 2.0  # never past the patience
    assert policy.delay(error, 5, waited=10.0) is None
    assert policy.delay(ConnectionError("reset"), 1) == 1.0
    assert policy.delay(ValueError("bad recipe"), 1) is None


def test_an_outage_longer_than_the_patience_fails_with_the_time_waited(hub):
    hub.hub.fail("GET", r"/api/models/", 503, times=1000)
    lines: list[str] = []
    policy = RetryPolicy(patience=0.3, first_delay=0.1)
    with pytest.raises(HubOutage, match=r"the Hub could not be reached \(it answered 503\)"):
        with_retries(lambda: hub.api.model_info("alice/x"), policy, on_retry=lines.append)
    assert lines and all(
        line.startswith("Hub unreachable (it answered 503), retrying in") for line in lines
    )
