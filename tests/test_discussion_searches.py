"""Evolutionary searches by Hub discussion, against the sandbox hub with a ``mergebot serve``
process: a fenced search spec is queued, answered with the fitness table and the link, and the
discussion closed; a bad field gets one sentence naming it; cancel and retry act on searches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SEARCH_TEXTS
from huggingface_hub import HfApi, hf_hub_download
from rendered import HOSTILE, hostile_elements
from service_env import BOT_TOKEN, job_commits, start_sandbox, start_serve, wait_until

pytestmark = pytest.mark.slow  # real processes: a server with its worker, the sandbox hub

BOB = "tok-bob"
REQUESTS = "mergebot/requests"


@pytest.fixture(scope="module")
def bot(tmp_path_factory, scored_family):
    root = tmp_path_factory.mktemp("discussion-searches")
    sandbox = start_sandbox({"alice": scored_family})
    HfApi(endpoint=sandbox.url, token=BOT_TOKEN).create_repo(REQUESTS)
    process, api = start_serve(
        sandbox.url,
        root / "work",
        MERGEBOT_WATCH_REPOS=REQUESTS,
        MERGEBOT_DISCUSSION_POLL_SECONDS="1",
    )
    api.sandbox = sandbox
    yield api
    process.stop()
    sandbox.__exit__()


def search_spec(budget: str = "{trials: 8, population: 4}") -> str:
    return f"""space: parameters
models: [{{model: alice/math}}, {{model: alice/code}}]
base_model: alice/base
fitness:
  - kind: nll
    data: {{examples: {json.dumps(SEARCH_TEXTS * 4)}}}
budget: {budget}
"""


def bob(bot) -> HfApi:
    return HfApi(endpoint=bot.sandbox.url, token=BOB)


def bot_replies(bot, num: int) -> list[str]:
    return [e.content for e in details(bot, num).events if e.author == "mergebot"]


def open_discussion(bot, title: str, spec: str, target: str = "") -> int:
    description = f"Please search:\n\n```yaml\n{spec}```\n"
    description += f"target: {target}\n" if target else ""
    return bob(bot).create_discussion(REQUESTS, title, description=description).num


def comment(bot, num: int, text: str) -> None:
    bob(bot).comment_discussion(REQUESTS, num, text)


def details(bot, num: int):
    return bob(bot).get_discussion_details(REQUESTS, num)


def bot_says(bot, num: int, words: str) -> list[str]:
    events = details(bot, num).events
    return [
        e.content
        for e in events
        if e.type == "comment" and e.author == "mergebot" and words in e.content
    ]


def discussion_jobs(bot, num: int) -> list[dict]:
    jobs = bot.call("GET", "/api/jobs", token=BOT_TOKEN)[1]
    return [j for j in jobs if j["discussion"] == f"model/{REQUESTS}#{num}"]


def table_rows(reply: str) -> dict[str, list[str]]:
    """The reply's Markdown table: each row's cells by its first cell."""
    rows = [line.strip("|").split("|") for line in reply.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_a_discussion_with_a_search_spec_gets_the_fitness_table_and_is_closed(bot):
    num = open_discussion(bot, "Search please", search_spec(), target="bob-searched")
    queued = wait_until(lambda: bot_says(bot, num, "Queued as search"), "the bot's first reply")
    assert "`alice/math@" in queued[0] and "`mergebot/bob-searched`" in queued[0]
    done = wait_until(lambda: bot_says(bot, num, "Done:"), "the bot's last reply")[0]
    (job,) = discussion_jobs(bot, num)
    assert job["kind"] == "search" and job["status"] == "succeeded"
    assert f"[mergebot/bob-searched]({job['url']})" in done
    rows = table_rows(done)
    assert rows["model"] == ["search fitness", "held-out fitness"]
    models = ["winner", "source alice/math", "source alice/code", "uniform ties merge"]
    labels = [label for label in rows if label not in ("model", "---")]
    assert [label.split("@")[0] for label in labels] == models, done  # sources are pinned
    outcome = bot.job(job["id"])["outcome"]["rows"]
    assert [rows[label] for label in labels] == [
        [f"{row['search']:.4g}", f"{row['held_out']:.4g}"] for row in outcome
    ]
    wait_until(lambda: details(bot, num).status == "closed", "the discussion to close")
    assert len(job_commits(bot.sandbox.url, "mergebot/bob-searched", BOT_TOKEN)) == 1


def test_a_spec_with_a_bad_field_gets_the_field_and_stays_open(bot):
    num = open_discussion(bot, "Bad search", search_spec("{trials: 0, population: 4}"))
    error = wait_until(lambda: bot_says(bot, num, "⚠"), "the error reply")[0]
    assert "could not queue this search (field `budget.trials`)" in error
    assert "must be greater than 0" in error and "corrected ```yaml" in error
    assert details(bot, num).status == "open"
    assert discussion_jobs(bot, num) == []


def test_cancel_and_retry_act_on_the_search_of_the_discussion(bot):
    num = open_discussion(bot, "Long search", search_spec("{trials: 300, population: 4}"))
    queued = wait_until(lambda: bot_says(bot, num, "Queued as search"), "the bot's first reply")
    comment(bot, num, "@mergebot cancel")
    wait_until(lambda: bot_says(bot, num, "Cancelling search"), "the cancel reply")
    (job,) = wait_until(
        lambda: [j for j in discussion_jobs(bot, num) if j["status"] == "cancelled"],
        "the search to be cancelled",
    )
    assert f"`{job['id']}`" in queued[0]

    comment(bot, num, "@mergebot retry")
    wait_until(lambda: len(bot_says(bot, num, "Queued as search")) == 2, "the retry's reply")
    again = bot.job(job["id"])
    assert again["kind"] == "search" and again["attempt"] == 2
    assert again["status"] in ("queued", "running")
    comment(bot, num, "@mergebot cancel")
    bot.wait_done(job["id"])
    assert bot.job(job["id"])["status"] == "cancelled"
    assert details(bot, num).status == "open"


def test_a_task_name_with_markup_is_refused_and_the_reply_shows_it_as_text(bot):
    spec = search_spec().replace("  - kind: nll", f"  - kind: nll\n    name: {json.dumps(HOSTILE)}")
    num = open_discussion(bot, "Search with a name", spec, target="named-search")
    (reply,) = wait_until(lambda: bot_replies(bot, num), "the bot's reply")
    assert "could not queue this search (field `fitness[0].name`)" in reply, reply
    assert "letters, digits, spaces" in reply and "onerror=alert(1)" in reply
    assert hostile_elements(reply) == [], reply
    assert discussion_jobs(bot, num) == []


def test_a_refused_recipe_is_quoted_as_code_in_the_reply(bot):
    recipe = f"merge_method: {json.dumps(HOSTILE)}\nmodels: [{{model: alice/math}}]\n"
    num = open_discussion(bot, "Merge with a method", recipe)
    (reply,) = wait_until(lambda: bot_replies(bot, num), "the bot's reply")
    assert "could not queue this merge" in reply and "onerror=alert(1)" in reply, reply
    assert hostile_elements(reply) == [], reply


def test_a_merge_whose_fields_carry_markup_publishes_them_as_code(bot, tmp_path):
    """A calibration field name is free text (a dataset's column); it reaches the card's
    calibration table and its recipe, in the bot's own namespace."""
    field = f"x` {HOSTILE} `y"
    recipe = f"""merge_method: fisher
models: [{{model: alice/math}}, {{model: alice/code}}]
calibration:
  examples: {json.dumps(SEARCH_TEXTS)}
  text_field: {json.dumps(field)}
"""
    num = open_discussion(bot, "Fisher merge", recipe, target="fields-as-code")
    done = wait_until(lambda: bot_says(bot, num, "Done:") or bot_says(bot, num, "⚠"), "the end")
    assert done[0].startswith("Done:"), done
    readme = hf_hub_download(
        "mergebot/fields-as-code",
        "README.md",
        endpoint=bot.sandbox.url,
        token=BOT_TOKEN,
        cache_dir=tmp_path,
    )
    card = Path(readme).read_text(encoding="utf-8")
    assert card.count("onerror=alert(1)") >= 2, card  # the calibration table and the recipe
    assert hostile_elements(card) == [], card
    assert hostile_elements(done[0]) == [], done[0]
