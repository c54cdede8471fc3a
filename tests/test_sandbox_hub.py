"""The sandbox hub answers the real ``huggingface_hub`` client as the Hub does."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from service.sandbox_hub import HubStore, SandboxHub, SandboxServer


@pytest.fixture
def server(tmp_path):
    with SandboxServer(
        SandboxHub(HubStore(tmp_path / "hub-data"), users={"tok": "alice", "tok-bob": "bob"})
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
            process.stdout.readline().strip() == "example models: demo/base, demo/math, demo/code"
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
