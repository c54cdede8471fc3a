"""The bot end to end: requests through the JSON API of a real ``mergebot serve`` process, merged
by its worker, pushed to the sandbox hub with the real client; what a requester sees when the Hub
fails, when they ask for what they may not, and that their token leaves no trace."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import load_weights, two_model_ties
from huggingface_hub import HfApi
from service_env import (
    BOT_TOKEN,
    job_commits,
    start_sandbox,
    start_serve,
    ties_recipe,
)

pytestmark = pytest.mark.slow  # real processes: a server, a worker, the sandbox hub

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(scope="module")
def sandbox(llama_family):
    server = start_sandbox({"alice": llama_family, "carol": llama_family})
    yield server
    server.__exit__()


@pytest.fixture(scope="module")
def bot(sandbox, tmp_path_factory):
    """``mergebot serve`` with its in-process worker, the bot's token, a SQLite job store."""
    work = tmp_path_factory.mktemp("bot") / "work"
    process, api = start_serve(sandbox.url, work)
    api.process, api.work = process, work
    yield api
    process.stop()


def sandbox_api(sandbox, method: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        sandbox.url + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def bot_token_paths(sandbox) -> list[str]:
    return [r.path for r in sandbox.hub.requests if r.token == BOT_TOKEN]


def test_a_request_becomes_a_merged_model_with_its_card(bot, sandbox, llama_family, tmp_path):
    status, job = bot.submit(ties_recipe("alice"), "alice/merged", ALICE, private=True)
    assert status == 202, job
    again = bot.submit(ties_recipe("alice"), "alice/merged", ALICE, private=True)
    assert again[1]["id"] == job["id"]
    # a private job is its requester's: others do not see it
    assert bot.call("GET", f"/api/jobs/{job['id']}")[0] == 404
    assert bot.call("GET", f"/api/jobs/{job['id']}", token=BOB)[0] == 404
    assert job["id"] not in [j["id"] for j in bot.call("GET", "/api/jobs")[1]]
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", done
    assert done["url"].endswith("/alice/merged") and done["progress"] == 1.0

    # transformers downloads the result from the sandbox hub and runs it
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "from safetensors.torch import save_file;"
        "m = AutoModelForCausalLM.from_pretrained('alice/merged', token='tok-alice');"
        "assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all();"
        "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])"
    )
    env = {**os.environ, "HF_ENDPOINT": sandbox.url, "HF_HOME": str(tmp_path / "hf")}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "w.safetensors")], env=env, check=True
    )
    base, (a, b, _) = llama_family
    expected = two_model_ties(base, a, b)
    got = load_weights(tmp_path)
    for name, tensor in expected.items():
        assert got[name].equal(tensor), name

    api = HfApi(endpoint=sandbox.url, token=ALICE)
    assert api.model_info("alice/merged").private
    assert len(job_commits(sandbox.url, "alice/merged", ALICE, job["id"])) == 1
    text = Path(
        api.hf_hub_download("alice/merged", "README.md", local_dir=tmp_path / "card")
    ).read_text()
    assert job["id"] in text
    for repo, sha in job["sources"].items():
        assert sha in text and len(sha) == 40, repo
    assert sandbox_api(
        sandbox, "POST", "/api/validate-yaml", {"content": text, "repoType": "model"}
    ) == {"errors": [], "warnings": []}

    # the job's folder and the requester's token are gone; the token was never in clear
    assert not (bot.work / "jobs" / job["id"]).exists()
    database = bot.work / "mergebot.sqlite"
    with sqlite3.connect(database) as db:
        assert db.execute("select count(*) from mergebot_tokens").fetchone()[0] == 0
    stored = b"".join(p.read_bytes() for p in bot.work.glob("mergebot.sqlite*"))
    assert ALICE.encode() not in stored
    assert ALICE not in bot.process.log and ALICE not in text and ALICE not in str(done)


def test_without_a_token_the_bot_pushes_only_to_its_namespace(bot, sandbox):
    status, error = bot.submit(ties_recipe("alice"), "alice/anonymous")
    assert status == 400 and error["field"] == "target" and "mergebot/" in error["error"]
    before = len(sandbox.hub.requests)
    status, job = bot.submit(ties_recipe("alice"), "mergebot/anonymous")
    assert status == 202, job
    assert bot.wait_done(job["id"])["status"] == "succeeded"
    assert len(job_commits(sandbox.url, "mergebot/anonymous", BOT_TOKEN, job["id"])) == 1
    # the bot's token went only to its own repo: the sources were read anonymously
    used = [r.path for r in sandbox.hub.requests[before:] if r.token == BOT_TOKEN]
    assert "/api/models/mergebot/anonymous/commit/main" in used
    assert not [path for path in used if "alice/" in path], used
    # a repo of the bot's that this requester did not make is not theirs to overwrite
    HfApi(endpoint=sandbox.url, token=BOT_TOKEN).create_repo("mergebot/not-yours")
    status, error = bot.submit(ties_recipe("alice"), "mergebot/not-yours")
    assert status == 400 and error["field"] == "target" and "already exists" in error["error"]


def test_a_private_source_is_never_read_with_the_bots_token(bot, sandbox):
    before = len(sandbox.hub.requests)
    status, error = bot.submit(ties_recipe("carol"), "bob/stolen", BOB)
    assert status == 400
    assert (
        "carol/" in error["error"] and "does not exist on the Hub or is private" in error["error"]
    )
    asked = [r for r in sandbox.hub.requests[before:] if "carol/" in r.path]
    assert asked and {r.token for r in asked} == {BOB}
    status, error = bot.submit(ties_recipe("carol"), "mergebot/stolen")
    assert status == 400 and "carol/" in error["error"]
    assert not [
        r for r in sandbox.hub.requests[before:] if "carol/" in r.path and r.token == BOT_TOKEN
    ]
    assert not HfApi(endpoint=sandbox.url, token=BOT_TOKEN).repo_exists("bob/stolen")


@pytest.mark.parametrize(
    ("recipe", "target", "field", "words"),
    [
        ("merge_method: ties\nmodels: [", "alice/x", None, "not valid YAML"),
        ("merge_method: nope\nmodels: [{model: alice/math}]", "alice/x", "merge_method", "nope"),
        (
            "merge_method: linear\nmodels: [{model: /etc/passwd}, {model: alice/math}]",
            "alice/x",
            "models",
            "Hub repos",
        ),
        (
            "merge_method: linear\nmodels: [{model: ../x/y}, {model: alice/math}]",
            "alice/x",
            "models",
            "Hub repos",
        ),
        (  # folders that exist where the server runs: looked up on the Hub, never read
            "merge_method: linear\nmodels: [{model: service/sandbox_hub}, {model: merge_engine/methods}]",
            "alice/x",
            None,
            "does not exist on the Hub",
        ),
        (ties_recipe("alice"), "not a repo", "target", "namespace/name"),
        (ties_recipe("alice"), "bob/x", "target", "alice/"),
        (
            ties_recipe("alice").replace("alice/code", "alice/missing"),
            "alice/x",
            None,
            "alice/missing",
        ),
    ],
)
def test_a_bad_request_gets_one_clear_sentence_at_once(bot, sandbox, recipe, target, field, words):
    status, error = bot.submit(recipe, target, ALICE)
    assert status == 400, error
    assert words in error["error"] and error["field"] == field, error
    assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists(
        target if "/" in target and " " not in target else "alice/x"
    )


def test_a_push_that_meets_500s_is_retried_and_lands_once(bot, sandbox):
    sandbox.hub.fail("POST", r"/api/models/alice/flaky/commit/", 500, times=2)
    status, job = bot.submit(ties_recipe("alice"), "alice/flaky", ALICE)
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", done
    assert len(job_commits(sandbox.url, "alice/flaky", BOT_TOKEN, job["id"])) == 1
    commits = [
        r for r in sandbox.hub.requests if r.method == "POST" and "alice/flaky/commit" in r.path
    ]
    assert len(commits) == 3


@pytest.mark.parametrize(
    ("route", "status", "words"),
    [
        (r"/api/repos/create", 401, "401"),
        (r"/api/models/alice/refused-\w+/commit/", 404, "404"),
    ],
)
def test_a_permanent_push_error_fails_the_job_at_once_and_leaves_no_repo(
    bot, sandbox, route, status, words
):
    target = f"alice/refused-{status}"
    sandbox.hub.fail("POST", route, status, times=1)
    before = len(sandbox.hub.requests)
    _, job = bot.submit(ties_recipe("alice"), target, ALICE)
    done = bot.wait_done(job["id"])
    assert done["status"] == "failed" and done["stage"] == "push"
    assert target in done["error"] and words in done["error"], done["error"]
    assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists(target)
    tries = [
        r for r in sandbox.hub.requests[before:] if r.method == "POST" and re.search(route, r.path)
    ]
    assert len(tries) == 1  # no retry of a permanent error
    assert not (bot.work / "jobs" / job["id"]).exists()
