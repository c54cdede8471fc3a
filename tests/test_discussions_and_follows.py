"""The bot without the Space: merge requests by Hub discussion, and re-merges when a followed
source gets a new commit — against the sandbox hub, with ``mergebot serve`` and ``mergebot
tick`` processes; every event handled once, however many paths see it."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi
from service_env import (
    BOT_TOKEN,
    MergebotProcess,
    job_commits,
    service_env,
    start_sandbox,
    start_serve,
    ties_recipe,
    wait_until,
)

pytestmark = pytest.mark.slow

ALICE, BOB, SECRET = "tok-alice", "tok-bob", "hook-secret"
REQUESTS = "mergebot/requests"


@pytest.fixture(scope="module")
def bot(llama_family, tmp_path_factory):
    sandbox = start_sandbox({"alice": llama_family})
    HfApi(endpoint=sandbox.url, token=BOT_TOKEN).create_repo(REQUESTS)
    work = tmp_path_factory.mktemp("discussions") / "work"
    settings = {
        "MERGEBOT_WATCH_REPOS": REQUESTS,
        "MERGEBOT_DISCUSSION_POLL_SECONDS": "1",
        "MERGEBOT_WEBHOOK_SECRET": SECRET,
        "MERGEBOT_MAX_QUEUED": "10",
    }
    process, api = start_serve(sandbox.url, work, **settings)
    api.sandbox, api.work, api.settings = sandbox, work, settings
    yield api
    process.stop()
    sandbox.__exit__()


def comments(bot, num: int) -> list[tuple[str, str]]:
    details = HfApi(endpoint=bot.sandbox.url, token=BOB).get_discussion_details(REQUESTS, num)
    return [(e.author, e.content) for e in details.events if e.type == "comment"]


def bot_says(bot, num: int, words: str) -> list[str]:
    return [text for author, text in comments(bot, num) if author == "mergebot" and words in text]


def is_closed(api: HfApi, num: int) -> bool:
    return api.get_discussion_details(REQUESTS, num).status == "closed"


def recipe_block(recipe: str) -> str:
    return f"Please merge these:\n\n```yaml\n{recipe}```\n"


def discussion_jobs(bot, num: int) -> list[dict]:
    return [
        j for j in bot.call("GET", "/api/jobs")[1] if j["discussion"] == f"model/{REQUESTS}#{num}"
    ]


def test_a_discussion_with_a_recipe_gets_a_merge_a_reply_and_is_closed(bot):
    bob = HfApi(endpoint=bot.sandbox.url, token=BOB)
    opened = bob.create_discussion(
        REQUESTS,
        "TIES please",
        description=recipe_block(ties_recipe("alice")) + "target: bob-ties\n",
    )
    wait_until(lambda: bot_says(bot, opened.num, "Queued as job"), "the bot's first reply")
    done = wait_until(lambda: bot_says(bot, opened.num, "Done:"), "the bot's last reply")
    assert "mergebot/bob-ties" in done[0] and "TIES" in done[0]
    wait_until(lambda: is_closed(bob, opened.num), "the discussion to close")
    card = HfApi(endpoint=bot.sandbox.url).hf_hub_download(
        "mergebot/bob-ties", "README.md", cache_dir=bot.work.parent / "c"
    )
    text = Path(card).read_text()
    assert "Requested by @bob" in text and f"/{REQUESTS}/discussions/{opened.num}" in text
    assert len(discussion_jobs(bot, opened.num)) == 1


def test_a_bad_recipe_gets_the_field_and_a_corrected_comment_merges(bot):
    bob = HfApi(endpoint=bot.sandbox.url, token=BOB)
    bad = ties_recipe("alice").replace("density: 0.5}", "density: 1.5}", 1)
    opened = bob.create_discussion(REQUESTS, "Bad TIES", description=recipe_block(bad))
    error = wait_until(lambda: bot_says(bot, opened.num, "⚠"), "the error reply")[0]
    assert "models[0].parameters.density" in error and "1.5" in error
    assert bob.get_discussion_details(REQUESTS, opened.num).status == "open"
    assert discussion_jobs(bot, opened.num) == []
    bob.comment_discussion(
        REQUESTS, opened.num, "Fixed:\n\n```yaml\n" + ties_recipe("alice") + "```\n"
    )
    wait_until(lambda: bot_says(bot, opened.num, "Done:"), "the merge of the corrected recipe")
    wait_until(lambda: is_closed(bob, opened.num), "the discussion to close")
    assert HfApi(endpoint=bot.sandbox.url).repo_exists(f"mergebot/requests-discussion-{opened.num}")


def test_a_webhook_and_the_poll_seeing_one_discussion_make_one_job(bot):
    status, answer = bot.call(
        "POST", "/api/webhooks/hub", {"event": {"scope": "discussion"}, "repo": {"name": REQUESTS}}
    )
    assert status == 401  # no secret, no action
    HfApi(endpoint=bot.sandbox.url, token=BOT_TOKEN).create_webhook(
        url=f"{bot.url}/api/webhooks/hub",
        watched=[{"type": "model", "name": REQUESTS}],
        secret=SECRET,
    )
    bob = HfApi(endpoint=bot.sandbox.url, token=BOB)
    recipe = ties_recipe("alice").replace("weight: 0.5", "weight: 0.4")
    opened = bob.create_discussion(REQUESTS, "Twice seen", description=recipe_block(recipe))
    wait_until(lambda: bot_says(bot, opened.num, "Done:"), "the merge")
    deliveries = bot.sandbox.hub.community.deliveries
    assert any(d.status == 200 and d.payload["event"]["scope"] == "discussion" for d in deliveries)
    assert len(bot_says(bot, opened.num, "Queued as job")) == 1
    assert len(discussion_jobs(bot, opened.num)) == 1


def tick(bot, name: str) -> MergebotProcess:
    env = service_env(bot.sandbox.url, bot.work, **bot.settings)
    return MergebotProcess(["tick", "--id", name], env, bot.work.parent / f"{name}.log")


def followed_commits(bot) -> list[str]:
    return job_commits(bot.sandbox.url, "alice/followed", ALICE)


def test_a_followed_merge_is_merged_again_once_when_a_source_moves(bot):
    alice = HfApi(endpoint=bot.sandbox.url, token=ALICE)
    _, job = bot.submit(ties_recipe("alice"), "alice/followed", ALICE, follow_sources=True)
    assert bot.wait_done(job["id"])["status"] == "succeeded"

    # nothing moved: a tick queues nothing
    quiet = tick(bot, "tick-0")
    quiet.process.wait(timeout=120)
    assert len(followed_commits(bot)) == 1

    moved = alice.upload_file(
        repo_id="alice/math", path_or_fileobj=b"v2", path_in_repo="notes.txt"
    ).oid
    clocks = [tick(bot, "tick-1"), tick(bot, "tick-2")]  # two clocks at once
    for clock in clocks:
        assert clock.process.wait(timeout=120) == 0, clock.log
    remerges = [
        j
        for j in bot.call("GET", "/api/jobs")[1]
        if j["target"] == "alice/followed" and j["origin"] == "schedule"
    ]
    assert len(remerges) == 1
    done = bot.wait_done(remerges[0]["id"])
    assert done["status"] == "succeeded" and done["sources"]["alice/math"] == moved
    assert len(followed_commits(bot)) == 2
    card = alice.hf_hub_download("alice/followed", "README.md", cache_dir=bot.work.parent / "c2")
    text = Path(card).read_text()
    assert moved in text and "Changes since the last merge" in text and f"→ {moved[:10]}" in text

    # a repo-update webhook and the next poll see the same new commit: one more re-merge
    HfApi(endpoint=bot.sandbox.url, token=BOT_TOKEN).create_webhook(
        url=f"{bot.url}/api/webhooks/hub",
        watched=[{"type": "user", "name": "alice"}],
        secret=SECRET,
    )
    alice.upload_file(repo_id="alice/code", path_or_fileobj=b"v2", path_in_repo="notes.txt")
    wait_until(lambda: len(followed_commits(bot)) == 3, "the webhook's re-merge")
    late = tick(bot, "tick-3")
    assert late.process.wait(timeout=120) == 0
    assert len(followed_commits(bot)) == 3
    schedule_jobs = [
        j
        for j in bot.call("GET", "/api/jobs")[1]
        if j["target"] == "alice/followed" and j["origin"] == "schedule"
    ]
    assert len(schedule_jobs) == 2


def test_only_the_requester_stops_the_following(bot):
    status, answer = bot.call("POST", "/api/follows/alice/followed/stop", {}, BOB)
    assert status == 403 and "only alice" in answer["error"]
    status, answer = bot.call("POST", "/api/follows/alice/followed/stop", {}, ALICE)
    assert status == 200 and "no longer follows" in answer["message"]
    HfApi(endpoint=bot.sandbox.url, token=ALICE).upload_file(
        repo_id="alice/math", path_or_fileobj=b"v3", path_in_repo="notes.txt"
    )
    assert tick(bot, "tick-4").process.wait(timeout=120) == 0
    assert len(followed_commits(bot)) == 3
