"""The sandbox hub answers the real ``huggingface_hub`` client as the Hub does."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from service_env import start_sandbox, start_serve, ties_recipe, wait_until

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
            == "example models: demo/base, demo/math, demo/code, demo/chat, demo/math-lora, "
            "demo/sd-base, demo/sd-dreamy, demo/sd-photo"
        )
        assert {s.rfilename for s in HfApi(endpoint=url).model_info("demo/sd-dreamy").siblings} >= {
            "model_index.json",
            "unet/diffusion_pytorch_model.safetensors",
        }
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


def get_page(server, path: str, token: str | None = None) -> tuple[int, str, str]:
    """(status, content type, text) of a page as a browser (or a token holder) opens it."""
    request = urllib.request.Request(server.url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


CARD = """---
tags: [merge]
---

# my-merge

A merge of **2 models** <script>alert('card')</script> [evil](javascript:alert(1)).

| model | role |
|---|---|
| [alice/base](http://127.0.0.1/alice/base) | base |

```yaml
merge_method: <b>linear</b>
```
"""


def test_a_model_page_shows_the_card_rendered_and_the_files_with_sizes(server):
    api = HfApi(endpoint=server.url, token="tok")
    api.create_repo("alice/merged")
    api.create_commit(
        "alice/merged",
        [
            CommitOperationAdd("README.md", CARD.encode()),
            CommitOperationAdd("model.safetensors", b"\0" * 2_500_000),
            CommitOperationAdd("config.json", b"{}"),
        ],
        commit_message="merge",
    )
    status, kind, page = get_page(server, "/alice/merged")
    assert status == 200 and kind.startswith("text/html")
    assert "<h1>my-merge</h1>" in page and "<strong>2 models</strong>" in page
    assert '<td><a href="http://127.0.0.1/alice/base">alice/base</a></td>' in page  # a table
    assert "tags: [merge]" not in page.split("<details>")[0]  # metadata is not card prose
    # HTML in the card is shown as text, never run
    assert "<script>" not in page and "&lt;script&gt;alert('card')" in page
    assert 'href="javascript:' not in page
    assert "merge_method: &lt;b&gt;linear&lt;/b&gt;" in page
    assert 'model.safetensors</a></td><td class="size">2.5 MB</td>' in page
    assert 'config.json</a></td><td class="size">2 Bytes</td>' in page
    link = re.search(r'href="(/alice/merged/resolve/[^"]+/config\.json)"', page)[1]
    assert get_page(server, link)[0] == 200

    api.create_repo("alice/no-card")
    status, _, page = get_page(server, "/alice/no-card")
    assert status == 200 and "no model card" in page


def test_the_root_page_lists_public_repos_and_private_ones_to_their_owner(server):
    HfApi(endpoint=server.url, token="tok").create_repo("alice/public-merge")
    HfApi(endpoint=server.url, token="tok").create_repo("alice/secret-merge", private=True)
    HfApi(endpoint=server.url, token="tok-bob").create_repo("bob/data", repo_type="dataset")
    status, kind, page = get_page(server, "/")
    assert status == 200 and kind.startswith("text/html")
    assert '<a href="/alice/public-merge">alice/public-merge</a>' in page
    assert "bob/data" in page and "secret-merge" not in page
    assert "secret-merge" not in get_page(server, "/", token="tok-bob")[2]
    assert '<a href="/alice/secret-merge">' in get_page(server, "/", token="tok")[2]
    assert get_page(server, "/alice/secret-merge")[0] == 404
    assert get_page(server, "/alice/secret-merge", token="tok")[0] == 200


@pytest.mark.slow
def test_the_result_link_of_a_merge_opens_its_card_as_a_page(llama_family, tmp_path):
    """The bot against the sandbox hub: the job log and the card say the same model count, the
    card links the sources on the sandbox hub, and the result link opens a readable page."""
    sandbox = start_sandbox({"alice": llama_family})
    bot = None
    try:
        api = HfApi(endpoint=sandbox.url, token="tok-alice")
        api.create_repo("alice/chat")
        api.upload_folder(repo_id="alice/chat", folder_path=llama_family[1][2])
        bot, client = start_serve(sandbox.url, tmp_path / "work")
        recipe = ties_recipe("alice") + "tokenizer_source: alice/chat\n"
        status, job = client.submit(recipe, "alice/merged", "tok-alice")
        assert status == 202, job
        done = client.wait_done(job["id"])
        assert done["status"] == "succeeded", done
        assert (
            done["log"][0] == "queued: ties of 3 models (a base and 2 fine-tunes) into alice/merged"
        )

        status, kind, page = get_page(sandbox, urlsplit(done["url"]).path)
        assert status == 200 and kind.startswith("text/html")
        assert "This model is a merge of 3 models (a base and 2 fine-tunes)" in page
        assert f'<a href="{sandbox.url}/alice/chat">alice/chat</a>' in page
        assert "huggingface.co" not in page and "pip install mergebot" not in page
        assert re.search(
            r"model[\w.-]*\.safetensors</a></td><td class=\"size\">[\d.]+ [kM]B<", page
        )
    finally:
        if bot:
            bot.stop()
        sandbox.__exit__()
