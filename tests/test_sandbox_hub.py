"""The sandbox hub answers the real ``huggingface_hub`` client as the Hub does."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from service_env import wait_until

from service.sandbox_hub import HubStore, SandboxHub, SandboxServer


@pytest.fixture
def server(tmp_path):
    with SandboxServer(
        SandboxHub(
            HubStore(tmp_path / "hub-data"),
            users={"tok": "alice", "tok-bob": "bob", "tok-carol": "carol"},
        )
    ) as server:
        yield server


def test_upload_then_download_round_trips_and_survives_a_restart(server, tmp_path):
    api = HfApi(endpoint=server.url, token="tok")
    api.create_repo("alice/demo")
    (tmp_path / "files" / "sub").mkdir(parents=True)
    (tmp_path / "files" / "a.txt").write_text("hello")
    (tmp_path / "files" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    commit = api.upload_folder(
        repo_id="alice/demo", folder_path=tmp_path / "files", commit_message="add files"
    )
    assert sorted(api.list_repo_files("alice/demo")) == ["a.txt", "sub/b.bin"]
    path = api.hf_hub_download(
        "alice/demo", "sub/b.bin", revision=commit.oid, cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == bytes(range(256)) * 10
    assert [c.title for c in api.list_repo_commits("alice/demo")][:1] == ["add files"]

    reopened = HubStore(tmp_path / "hub-data")
    assert reopened.get("model", "alice/demo").resolve("main").oid == commit.oid


def test_a_commit_on_a_stale_parent_is_refused(server):
    api = HfApi(endpoint=server.url, token="tok")
    api.create_repo("alice/demo")
    first = api.create_commit(
        "alice/demo", [CommitOperationAdd("x", b"1")], commit_message="one"
    ).oid
    api.create_commit("alice/demo", [CommitOperationAdd("x", b"2")], commit_message="two")
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(
            "alice/demo",
            [CommitOperationAdd("x", b"3")],
            commit_message="three",
            parent_commit=first,
        )
    assert caught.value.response.status_code == 412


def test_private_repos_are_hidden_from_other_users(server):
    HfApi(endpoint=server.url, token="tok").create_repo("alice/private", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=server.url, token="tok-bob").model_info("alice/private")
    assert HfApi(endpoint=server.url, token="tok").model_info("alice/private").private


def test_validate_yaml_rejects_a_local_base_model(server):
    def validate(card: str) -> int:
        body = json.dumps({"content": card, "repoType": "model"}).encode()
        request = urllib.request.Request(
            f"{server.url}/api/validate-yaml", body, {"Content-Type": "application/json"}
        )
        try:
            return urllib.request.urlopen(request).status
        except urllib.error.HTTPError as error:
            return error.code

    assert validate("---\nbase_model: org/model\n---\n# card") == 200
    assert validate("---\nbase_model: /home/me/model\n---\n# card") == 400


def test_the_sandbox_hub_command_serves_seeded_example_models(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "sandbox-hub",
            "--port",
            "0",
            "--seed",
            "--token",
            "tok-demo",
            "--data",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().split()[3].rstrip(";")
        assert (
            process.stdout.readline().strip()
            == "example models: demo/base, demo/math, demo/code, demo/chat"
        )
        api = HfApi(endpoint=url, token="tok-demo")
        assert {s.rfilename for s in api.model_info("demo/math").siblings} >= {
            "config.json",
            "model.safetensors",
        }
        assert api.whoami()["name"] == "demo"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert HubStore(tmp_path).get("model", "demo/code") is not None  # kept in the data folder


def test_discussions_through_the_client_and_kept_across_a_restart(server, tmp_path):
    alice, bob = (
        HfApi(endpoint=server.url, token="tok"),
        HfApi(endpoint=server.url, token="tok-bob"),
    )
    alice.create_repo("alice/model")
    opened = bob.create_discussion(
        "alice/model", "Merge request", description="```yaml\nmerge_method: linear\n```"
    )
    assert opened.num == 1 and opened.author == "bob" and opened.status == "open"
    assert opened.events[0].content.startswith("```yaml")
    reply = alice.comment_discussion("alice/model", 1, "Queued as job-1")
    assert reply.content == "Queued as job-1" and reply.author == "alice"
    assert (
        alice.rename_discussion("alice/model", 1, "Merge request: done").new_title
        == "Merge request: done"
    )
    assert (
        bob.change_discussion_status("alice/model", 1, "closed", comment="thanks").new_status
        == "closed"
    )
    with pytest.raises(HfHubHTTPError):  # only the owner or the author may close a discussion
        HfApi(endpoint=server.url, token="tok-carol").change_discussion_status(
            "alice/model", 1, "open"
        )

    listed = list(alice.get_repo_discussions("alice/model"))
    assert [(d.num, d.title, d.status) for d in listed] == [(1, "Merge request: done", "closed")]
    assert list(alice.get_repo_discussions("alice/model", discussion_status="open")) == []
    with SandboxServer(
        SandboxHub(HubStore(tmp_path / "hub-data"), users={"tok": "alice"})
    ) as again:
        details = HfApi(endpoint=again.url, token="tok").get_discussion_details("alice/model", 1)
    assert [e.type for e in details.events] == [
        "comment",
        "comment",
        "title-change",
        "comment",
        "status-change",
    ]


def test_webhooks_report_new_commits_and_discussion_comments(server):
    from huggingface_hub import WebhookPayload

    received: list[tuple[str | None, dict]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers.get("X-Webhook-Secret"), json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        api = HfApi(endpoint=server.url, token="tok")
        api.create_repo("alice/watched")
        api.create_repo("alice/ignored")
        hook = api.create_webhook(
            url=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
            watched=[{"type": "model", "name": "alice/watched"}],
            domains=["repo", "discussion"],
            secret="s3cret",
        )
        assert hook.secret == "s3cret" and not hook.disabled
        old = api.model_info("alice/watched").sha
        new = api.upload_file(
            repo_id="alice/watched", path_or_fileobj=b"v2", path_in_repo="w.txt"
        ).oid
        api.upload_file(repo_id="alice/ignored", path_or_fileobj=b"x", path_in_repo="x.txt")
        HfApi(endpoint=server.url, token="tok-bob").create_discussion(
            "alice/watched", "Please merge"
        )
        deliveries = server.hub.community.deliveries
        wait_until(lambda: len(deliveries) >= 2, "two webhook deliveries", deadline=10)
        assert all(d.status == 204 for d in deliveries)
        payloads = [WebhookPayload.model_validate(p) for _, p in received]
        assert {secret for secret, _ in received} == {"s3cret"}
        assert all(p.repo.name == "alice/watched" for p in payloads)
        update = next(p for p in payloads if p.event.scope == "repo.content")
        assert (update.updatedRefs[0].oldSha, update.updatedRefs[0].newSha) == (old, new)
        opened = next(p for p in payloads if p.event.scope == "discussion")
        assert opened.discussion.title == "Please merge" and opened.discussion.num == 1
    finally:
        receiver.shutdown()


def test_a_slow_hub_answers_the_matching_requests_after_the_delay(server):
    server.hub.slow(1.0, "GET", r"/api/whoami-v2")
    started = time.monotonic()
    assert HfApi(endpoint=server.url, token="tok").whoami()["name"] == "alice"
    assert time.monotonic() - started >= 1.0


def _whoami_in_thread(server) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["answer"] = HfApi(endpoint=server.url, token="tok").whoami()
        except Exception as error:  # noqa: BLE001  (the test asserts which)
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_until(
        lambda: any(r.path == "/api/whoami-v2" for r in server.hub.requests),
        "the whoami to reach the hub",
        deadline=10,
    )
    return thread, outcome


def test_a_hub_that_goes_down_refuses_connections_then_comes_back_on_the_same_url(server):
    api = HfApi(endpoint=server.url, token="tok")
    url = server.url
    assert api.whoami()["name"] == "alice"  # leaves a kept-alive connection in the client

    server.go_down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    with pytest.raises(Exception) as caught:  # the transport's error, whichever library it is
        api.whoami()
    causes, error = [], caught.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(cause, ConnectionRefusedError) for cause in causes), causes

    server.come_back()
    assert server.url == url
    assert api.whoami()["name"] == "alice"
    server.go_down()  # __exit__ works with the server down too


def test_an_outage_cuts_a_slow_request_in_flight_and_the_hub_comes_back(server):
    server.hub.slow(30.0, "GET", r"/api/whoami-v2", times=1)
    slow_call, outcome = _whoami_in_thread(server)
    # only that request waits: the next whoami is answered while the slow one is still pending
    assert HfApi(endpoint=server.url, token="tok").whoami()["name"] == "alice"
    assert slow_call.is_alive()

    server.go_down()
    slow_call.join(timeout=30)
    assert not slow_call.is_alive() and "error" in outcome, outcome
    server.come_back()
    assert HfApi(endpoint=server.url, token="tok").whoami()["name"] == "alice"
