"""Requests built to make the bot work without end, against a real ``mergebot serve`` and the
sandbox hub: a ``discard:`` pattern that backtracks for ever, too many or too long patterns, a
discard leaving out everything, and discussion comments whose text made the parser quadratic.
Each is answered (or refused with its sentence) while ``/api/health`` keeps answering within
a second."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from service_env import BOT_TOKEN, start_sandbox, start_serve, ties_recipe, wait_until

pytestmark = pytest.mark.slow  # real processes: a server with its worker, the sandbox hub

ALICE, BOB = "tok-alice", "tok-bob"
REQUESTS = "mergebot/requests"
COMMENT_KB = 128
T = TypeVar("T")
HOSTILE = r"([\w.]+)+!"  # Python's re backtracks 2^len(name) times on every tensor name


@pytest.fixture(scope="module")
def bot(llama_family, tmp_path_factory):
    sandbox = start_sandbox({"alice": llama_family})
    HfApi(endpoint=sandbox.url, token=BOT_TOKEN).create_repo(REQUESTS)
    work = tmp_path_factory.mktemp("bounded") / "work"
    process, api = start_serve(
        sandbox.url,
        work,
        MERGEBOT_WATCH_REPOS=REQUESTS,
        MERGEBOT_DISCUSSION_POLL_SECONDS="1",
        MERGEBOT_MAX_QUEUED="10",
        MERGEBOT_MAX_COMMENT_KB=str(COMMENT_KB),
    )
    api.sandbox = sandbox
    yield api
    process.stop()
    sandbox.__exit__()


def with_discard(patterns: list[str]) -> str:
    return ties_recipe("alice") + f"discard: {json.dumps(patterns)}\n"


def while_healthy(bot, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``'s answer, asking ``/api/health`` all the while it runs."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, *args)
        bot.healthy_while(lambda: not answer.done())
        return answer.result()


def refusal(answer: tuple[int, dict], field: str) -> str:
    status, body = answer
    assert status == 400 and body["field"] == field, body
    return body["error"]


def test_a_backtracking_discard_pattern_stalls_nothing(bot):
    status, job = while_healthy(bot, bot.submit, with_discard([HOSTILE]), "alice/hostile", ALICE)
    assert status == 202, job
    assert bot.wait_done(job["id"])["status"] == "succeeded"


def test_too_many_too_long_and_drop_everything_patterns_are_refused(bot):
    many = while_healthy(bot, bot.submit, with_discard(["^x"] * 5000), "alice/many", ALICE)
    assert "has 5,000 patterns, more than the 64 allowed" in refusal(many, "discard")

    long = while_healthy(bot, bot.submit, with_discard(["a" * 200_000]), "alice/long", ALICE)
    assert "200,000 characters long, more than the 512 allowed" in refusal(long, "discard[0]")

    everything = bot.submit(with_discard(["^model", ".*"]), "alice/everything", ALICE)
    assert "'.*' matches an empty name" in refusal(everything, "discard[1]")

    every_name = bot.submit(with_discard(["."]), "alice/every-name", ALICE)
    assert "leaves out every tensor of the models" in refusal(every_name, "discard")

    lookahead = bot.submit(with_discard(["^(?!model)"]), "alice/lookahead", ALICE)
    sentence = refusal(lookahead, "discard[0]")
    assert "uses lookaround" in sentence and "list what to leave out instead" in sentence


def test_a_duration_padded_with_spaces_is_refused_at_once(bot):
    """A ``wall_time`` of 200,000 spaces between a number and a letter: Python's re tried
    every split of them between the two ``\\s*`` around the optional unit."""
    spec = (
        "space: parameters\nmodels: [{model: alice/math}, {model: alice/code}]\n"
        "fitness: [{kind: nll, data: {examples: [a b c]}}]\n"
        f"budget: {{trials: 4, wall_time: '1{' ' * 200_000}x'}}\n"
    )
    body = {"spec": spec, "target": "alice/padded"}
    sentence = refusal(
        while_healthy(bot, bot.call, "POST", "/api/searches", body, ALICE), "budget.wall_time"
    )
    assert "is not a duration; write e.g. 600, 90s, 30m or 2h" in sentence


def test_a_model_whose_tensor_name_made_the_layer_pattern_quadratic_is_refused(
    bot, llama_family, tmp_path
):
    """A tensor named ``model.layers.1.`` 22,000 times and a line break: the layer pattern
    tried every ``layers.1.`` and scanned to the end from each (a minute, holding the GIL)."""
    odd = tmp_path / "odd"
    shutil.copytree(llama_family[0], odd)
    weights = load_file(odd / "model.safetensors")
    weights["model.layers.1." * 22_000 + "\n\n"] = torch.zeros(1)
    save_file(weights, odd / "model.safetensors")
    alice = HfApi(endpoint=bot.sandbox.url, token=ALICE)
    for repo in ("alice/odd-a", "alice/odd-b"):
        alice.create_repo(repo)
        alice.upload_folder(repo_id=repo, folder_path=odd)
    recipe = (
        "merge_method: linear\nmodels:\n  - {model: alice/odd-a, parameters: {weight: 0.5}}\n"
        "  - {model: alice/odd-b, parameters: {weight: 0.5}}\n"
    )
    status, body = while_healthy(bot, bot.submit, recipe, "alice/odd", ALICE)
    assert status == 400 and "has a tensor name of 330,002 characters" in body["error"], body


def bot_says(bot, num: int, words: str) -> list[str]:
    details = HfApi(endpoint=bot.sandbox.url, token=BOB).get_discussion_details(REQUESTS, num)
    return [e.content for e in details.events if e.author == "mergebot" and words in e.content]


def test_discussions_with_many_newlines_or_unclosed_fences_stall_nothing(bot):
    bob = HfApi(endpoint=bot.sandbox.url, token=BOB)
    block = f"```yaml\n{ties_recipe('alice')}```\n"
    # no target: line after the newlines, so the old regex tried each of them to its end
    newlines = bob.create_discussion(REQUESTS, "Newlines", description=block + "\n" * 60_000 + "-")
    assert bot.healthy_while(lambda: not bot_says(bot, newlines.num, "Queued as job"))
    name = f"mergebot/requests-discussion-{newlines.num}"
    assert name in bot_says(bot, newlines.num, "Queued as job")[0]

    fence = "```yaml\n" + "\n" * 60_000 + "-"
    unclosed = bob.create_discussion(REQUESTS, "Fences", description=fence)
    bob.comment_discussion(REQUESTS, unclosed.num, "@mergebot retry")
    assert bot.healthy_while(lambda: not bot_says(bot, unclosed.num, "no job of this discussion"))

    too_long = bob.create_discussion(REQUESTS, "Long", description=block + "#" * COMMENT_KB * 1024)
    said = wait_until(lambda: bot_says(bot, too_long.num, "⚠"), "the bot's reply")[0]
    assert f"more than the {COMMENT_KB} KB I read" in said
