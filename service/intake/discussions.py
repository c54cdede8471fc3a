"""Merge and search requests by Hub discussion.

A discussion (on a watched repo) whose description or a later comment holds a fenced ``yaml``
block asks for a job: a YAML mapping with any of the keys only a search spec has (``space``,
``fitness``, ``budget``) asks for an evolutionary search, anything else is read as a merge
recipe (so YAML that cannot be read gets the recipe's error). An optional ``target: name`` line
names the result, which always goes to the bot's namespace (the bot holds no token of the
author) and is read from anonymously. The bot replies at once (queued, or the error naming the
field and how to fix it), again when the job ends (the link and a summary — a merge's method and
sources, a search's fitness table — then it closes the discussion; on failure, the reason, and
it stays open). ``@mergebot retry``, ``@mergebot cancel`` and ``@mergebot unfollow`` from the
author act on the discussion's latest job, merge or search. Every event is handled once
(``service.workflows.once``), whether the clock's poll, a webhook, or two processes see it.
"""

from __future__ import annotations

import logging
import re
import time

from huggingface_hub import HfApi

from merge_engine.errors import MergeError, RecipeError
from merge_engine.evolve.spec import SearchSpec
from merge_engine.recipe import quote
from merge_engine.recipe.limits import load_yaml
from merge_engine.recipe.schema import Recipe
from service.hub_client.hub import hub_api
from service.intake.request import Identity, MergeRequest, SearchRequest, is_search_spec
from service.workflows.job_store import ACTIVE, Job, Kind
from service.workflows.once import claim
from service.workflows.replies import (
    DOCUMENT,
    NOUN,
    discussion_key,
    parse_discussion_key,
    reply,
)

log = logging.getLogger("mergebot.discussions")
TARGET = re.compile(r"\s*target:\s*([\w.-]+)\s*")
COMMAND = re.compile(r"@mergebot\s+(retry|cancel|unfollow)\b")
DAY = 24 * 3600


def read_comment(text: str) -> tuple[str | None, str | None]:
    """A comment's first closed ```yaml block (None when it has none) and the name of its
    first ``target:`` line outside every yaml block, in one pass over its lines (a regex over
    the whole text took time quadratic in its newlines, or in its unclosed fences)."""
    found: str | None = None
    target: str | None = None
    opening: str | None = None
    block: list[str] = []
    outside: list[str] = []
    for line in text.split("\n"):
        if opening is None:
            if line.rstrip().endswith(("```yaml", "```yml")):
                opening, block = line, []
            else:
                outside.append(line)
            continue
        end = line.find("```")
        if end < 0:
            block.append(line)
            continue
        block.append(line[:end])
        found = "\n".join(block) if found is None else found
        outside.append(line[end + 3 :])
        opening = None
    if opening is not None:  # never closed: its lines are text
        outside += [opening, *block]
    for line in outside:
        if named := TARGET.fullmatch(line):
            target = named[1]
            break
    return found, target


class DiscussionWatcher:
    def __init__(self, service):
        self.service = service
        self.settings = service.settings

    @property
    def api(self) -> HfApi:
        return hub_api(self.settings.endpoint, self.settings.bot_token)

    def poll(self, only_repo: str | None = None) -> None:
        """Handle every new event of every open discussion on the watched repos."""
        for repo_key in self.settings.watch_repos:
            repo_type, repo_id = repo_key.split("/", 1)
            if only_repo and repo_id != only_repo:
                continue
            try:
                discussions = list(
                    self.api.get_repo_discussions(
                        repo_id, repo_type=repo_type, discussion_status="open"
                    )
                )
            except Exception as error:  # noqa: BLE001  (the next poll tries again)
                log.warning("cannot list the discussions of %s: %s", repo_id, type(error).__name__)
                continue
            for discussion in discussions:
                if discussion.is_pull_request:
                    continue
                try:
                    self._handle(repo_key, discussion.num)
                except Exception as error:  # noqa: BLE001  (one bad discussion must not stop the rest)
                    log.warning(
                        "discussion %s#%d: %s", repo_id, discussion.num, type(error).__name__
                    )

    def _handle(self, repo_key: str, num: int) -> None:
        repo_type, repo_id = repo_key.split("/", 1)
        details = self.api.get_discussion_details(repo_id, num, repo_type=repo_type)
        key = discussion_key(repo_key, num)
        for event in details.events:
            if event.type != "comment" or event.author in (None, "deleted", self._bot_name):
                continue
            if not claim(self.service.store.engine, f"discussion-event:{key}:{event.id}"):
                continue
            self._act(key, details.author, event.author, event.content or "")

    @property
    def _bot_name(self) -> str | None:
        return self.settings.bot_namespace

    def _act(self, key: str, opener: str, author: str, text: str) -> None:
        if author != opener:
            return  # conversation, or someone else's recipe: not a request
        size, limit = len(text.encode("utf-8", "surrogatepass")), self.settings.max_comment_bytes
        if size > limit:
            reply(
                self.settings,
                key,
                f"⚠ This comment is {size / 1024:,.0f} KB, more than the {limit / 1024:,.0f} KB "
                "I read; post the ```yaml block in a shorter comment.",
            )
            return
        command = COMMAND.search(text)
        if command:
            self._command(key, author, command[1])
            return
        found, target = read_comment(text)
        if found is None:
            return
        _, repo_id, num = parse_discussion_key(key)
        name = target or f"{repo_id.split('/')[1]}-discussion-{num}"
        target_repo = f"{self.settings.bot_namespace}/{name}"
        self._submit(key, author, found, target_repo, self._kind_of(found))

    def _kind_of(self, text: str) -> Kind:
        """Whether a request's YAML asks for a search or a merge (see the module docstring)."""
        try:
            document = load_yaml(text, self.settings.recipe_limits)
        except RecipeError:
            return "merge"  # reading it as a recipe reports the error
        return "search" if is_search_spec(document) else "merge"

    def _submit(self, key: str, author: str, text: str, target: str, kind: Kind) -> None:
        try:
            self._check_author(author)
            job = self._queue(key, author, text, target, kind)
        except MergeError as error:
            field = (
                f" (field {quote.code(error.field)})"
                if isinstance(error, RecipeError) and error.field
                else ""
            )
            reply(
                self.settings,
                key,
                f"⚠ I could not queue this {kind}{field}:\n\n{quote.code_block(error)}\n\nFix the {DOCUMENT[kind]} and comment with the corrected ```yaml block.",
            )
            return
        sources = ", ".join(f"`{repo}@{sha[:8]}`" for repo, sha in sorted(job.sources.items()))
        doing = "searching for the best merge of" if kind == "search" else "merging"
        reply(
            self.settings,
            key,
            f"Queued as {NOUN[kind]} `{job.id}`: {doing} {sources} into `{target}`. I will reply here when it is done.",
        )

    def _queue(self, key: str, author: str, text: str, target: str, kind: Kind) -> Job:
        """Read ``text`` as a search spec or a recipe and submit it for ``author``."""
        identity = Identity(name=author)
        if kind == "search":
            spec = self.service.read_spec(text)
            self._check_namespaces(spec)
            request = SearchRequest(spec, target, author, "discussion", discussion=key)
            return self.service.submit_search(request, identity)
        recipe = self.service.read_recipe(text)
        self._check_namespaces(recipe)
        merge = MergeRequest(
            recipe, target, author, "discussion", discussion=key, follow_sources=False
        )
        return self.service.submit(merge, identity)

    def _check_author(self, author: str) -> None:
        since = time.time() - DAY
        count = self.service.store.count_since(author, "discussion", since)
        if count >= self.settings.discussion_daily:
            raise MergeError(
                f"{author} already asked for {count} merges or searches today, the most this bot takes per author per day; try again tomorrow"
            )

    def _check_namespaces(self, document: Recipe | SearchSpec) -> None:
        for part in (p for ref in document.referenced_models() for p in ref.parts()):
            namespace = part.path.split("/")[0]
            denied = namespace in self.settings.deny_namespaces
            if denied or (
                self.settings.allow_namespaces and namespace not in self.settings.allow_namespaces
            ):
                raise RecipeError(
                    f"this bot does not merge models of {namespace}/; use models of other namespaces",
                    field="models",
                )

    def _command(self, key: str, author: str, command: str) -> None:
        job = self.service.store.of_discussion(key)
        if job is None:
            reply(
                self.settings,
                key,
                "There is no job of this discussion yet: post a recipe or a search spec in a ```yaml block.",
            )
            return
        if command == "cancel":
            if job.status in ACTIVE:
                self.service.request_cancel(job)
                reply(self.settings, key, f"Cancelling {NOUN[job.kind]} `{job.id}`.")
            else:
                reply(
                    self.settings,
                    key,
                    f"The {NOUN[job.kind]} `{job.id}` has already ended ({job.status}).",
                )
        elif command == "retry":  # as asked: unpinned, so sources are pinned anew
            self._submit(key, author, job.request_recipe or job.recipe, job.target, job.kind)
        else:
            self.service.follows.stop(job.target, f"unfollowed by {author}")
            reply(self.settings, key, f"`{job.target}` no longer follows its sources.")
