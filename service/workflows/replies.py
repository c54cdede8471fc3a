"""What the bot says in the Hub discussion that asked for a job: the one reply function (a
comment, and closing the discussion when the job worked) that the watcher answers a request
with, and the report at the end of the job's workflow (the link and a summary — a merge's
method and sources, a search's fitness table — or the reason it failed). Each job's end is
reported once (``service.workflows.once``), whichever process gets there first.
"""

from __future__ import annotations

from typing import Any

from merge_engine.evolve.report import fitness_text
from merge_engine.recipe import quote
from service.hub_client.hub import hub_api
from service.settings import Settings
from service.workflows.job_store import Job, JobStore, Kind
from service.workflows.once import claim

NOUN: dict[Kind, str] = {"merge": "job", "search": "search"}
DOCUMENT: dict[Kind, str] = {"merge": "recipe", "search": "search spec"}


def discussion_key(repo_key: str, num: int) -> str:
    return f"{repo_key}#{num}"


def parse_discussion_key(key: str) -> tuple[str, str, int]:
    """``type/ns/name#num`` → (repo type, ``ns/name``, num)."""
    repo_key, _, num = key.partition("#")
    repo_type, _, repo_id = repo_key.partition("/")
    return repo_type, repo_id, int(num)


def discussion_url(endpoint: str, key: str) -> str:
    repo_type, repo_id, num = parse_discussion_key(key)
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{endpoint}/{prefix}{repo_id}/discussions/{num}"


def reply(settings: Settings, key: str, text: str, close: bool = False) -> None:
    """Comment ``text`` on discussion ``key`` as the bot, and close it with ``close``."""
    repo_type, repo_id, num = parse_discussion_key(key)
    api = hub_api(settings.endpoint, settings.bot_token)
    api.comment_discussion(repo_id, num, text, repo_type=repo_type)
    if close:
        api.change_discussion_status(repo_id, num, "closed", repo_type=repo_type)


def report(settings: Settings, store: JobStore, job: Job) -> None:
    """The job of a discussion ended: say how, and close the discussion if it worked."""
    if job.discussion is None or not claim(store.engine, f"report:{job.workflow_id}"):
        return
    if job.status == "succeeded":
        summary = (
            _fitness_table(job.outcome or {})
            if job.kind == "search"
            else _card_summary(job.card or "")
        )
        reply(
            settings,
            job.discussion,
            f"Done: [{job.target}]({job.url}) (commit `{(job.commit or '')[:10]}`).\n\n{summary}",
            close=True,
        )
    elif job.status == "failed":
        reply(
            settings,
            job.discussion,
            f"⚠ The {NOUN[job.kind]} `{job.id}` failed:\n\n{quote.code_block(job.error or '')}\n\nComment `@mergebot retry` to try again, or post a corrected {DOCUMENT[job.kind]}.",
        )
    elif job.status == "cancelled":
        reply(settings, job.discussion, f"The {NOUN[job.kind]} `{job.id}` was cancelled.")


def _fitness_table(outcome: dict[str, Any]) -> str:
    """A finished search's fitness table (the winner first, then each source and the uniform
    merge), for a reply."""
    rows = ["| model | search fitness | held-out fitness |", "|---|---|---|"]
    rows += [
        f"| {quote.cell(row['model'])} | {fitness_text(row['search'])} | "
        f"{fitness_text(row['held_out'])} |"
        for row in outcome.get("rows", [])
    ]
    trials = f"The winner of {outcome.get('trials', 0)} trials, on the search and held-out splits:"
    return "\n".join([trials, "", *rows])


def _card_summary(card: str) -> str:
    """The card's method line and its source table, for a reply."""
    lines = card.splitlines()
    method = next((line for line in lines if line.startswith("**")), "")
    table = [line for line in lines if line.startswith("|") and ("`" in line or "model" in line)]
    return "\n".join([method, "", *table]).strip()
