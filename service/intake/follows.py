"""Published merges that follow their sources: when a source gets a new commit, the same recipe
is merged again at the new revisions and pushed as a new commit to the same repo.

A follow keeps the recipe as asked (references a user pinned stay pinned; the others float),
the commit each source was merged at, and — for a requester who signed in — their token,
encrypted, because every re-merge pushes with it; it is erased when the following stops. A
source that disappears or becomes unreadable stops the following with the reason recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa

from merge_engine.errors import MergeError
from merge_engine.recipe.schema import recipe_from_text
from service.hub_client.hub import hub_api
from service.intake.request import Identity, MergeRequest
from service.workflows.job_store import Job, metadata
from service.workflows.once import claim

log = logging.getLogger("mergebot.follows")

follows_table = sa.Table(
    "mergebot_follows",
    metadata,
    sa.Column("target", sa.String(200), primary_key=True),
    sa.Column("requester", sa.String(200), nullable=False),
    sa.Column("private", sa.Boolean, nullable=False),
    sa.Column("discussion", sa.String(300)),
    sa.Column("recipe", sa.Text, nullable=False),
    sa.Column("sources", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def token_key(target: str) -> str:
    """Where the vault keeps the token that pushes ``target``'s re-merges."""
    return f"follow:{target}"


@dataclass
class Follow:
    target: str
    requester: str
    private: bool
    discussion: str | None
    recipe: str
    sources: dict[str, str]
    active: bool
    reason: str | None
    updated_at: float

    @property
    def token_key(self) -> str:
        return token_key(self.target)


class Follows:
    def __init__(self, service):
        self.service = service
        self.engine = service.store.engine
        metadata.create_all(self.engine, tables=[follows_table])

    def record(self, job: Job, token: str | None) -> None:
        """``job`` succeeded and follows its sources: remember what it merged."""
        row = {
            "target": job.target,
            "requester": job.requester,
            "private": job.private,
            "discussion": job.discussion,
            "recipe": job.request_recipe or job.recipe,
            "sources": json.dumps(job.sources, sort_keys=True),
            "active": True,
            "reason": None,
            "updated_at": time.time(),
        }
        with self.engine.begin() as db:
            db.execute(follows_table.delete().where(follows_table.c.target == job.target))
            db.execute(follows_table.insert().values(**row))
        if token:
            self.service.vault.put(token_key(job.target), token)

    def get(self, target: str) -> Follow | None:
        with self.engine.connect() as db:
            row = db.execute(follows_table.select().where(follows_table.c.target == target)).first()
        return _follow(row) if row else None

    def active(self) -> list[Follow]:
        with self.engine.connect() as db:
            rows = db.execute(follows_table.select().where(follows_table.c.active)).all()
        return [_follow(row) for row in rows]

    def stop(self, target: str, reason: str) -> None:
        self._set(target, active=False, reason=reason)
        self.service.vault.erase(token_key(target))

    def restart(self, target: str, token: str | None) -> None:
        self._set(target, active=True, reason=None)
        if token:
            self.service.vault.put(token_key(target), token)

    def _set(self, target: str, **values) -> None:
        with self.engine.begin() as db:
            db.execute(
                follows_table.update()
                .where(follows_table.c.target == target)
                .values(updated_at=time.time(), **values)
            )

    # --- checking --------------------------------------------------------------------------

    def check_all(self, only_source: str | None = None) -> list[Job]:
        """Merge again every follow whose sources moved (or only those reading ``only_source``);
        return the re-merge jobs queued by this call."""
        queued = []
        for follow in self.active():
            if only_source and only_source not in follow.sources:
                continue
            job = self.check(follow)
            if job:
                queued.append(job)
        return queued

    def check(self, follow: Follow) -> Job | None:
        settings = self.service.settings
        token = self.service.vault.get(follow.token_key)
        recipe = recipe_from_text(follow.recipe)
        api = hub_api(settings.endpoint, token)
        moved = []
        for ref in (part for model in recipe.referenced_models() for part in model.parts()):
            if ref.revision is not None or ref.path not in follow.sources:
                continue  # pinned by the requester: it does not move
            try:
                sha = api.model_info(ref.path).sha
            except Exception as error:  # noqa: BLE001  (gone, gated, private: all stop it)
                reason = (
                    f"{ref.path} can no longer be read ({type(error).__name__}); following stopped"
                )
                log.warning("%s: %s", follow.target, reason)
                self.stop(follow.target, reason)
                return None
            if sha != follow.sources[ref.path]:
                moved.append(f"{ref.path}: {follow.sources[ref.path][:10]} → {sha[:10]}")
        if not moved:
            return None
        digest = hashlib.sha256("\n".join(sorted(moved)).encode()).hexdigest()[:16]
        if not claim(self.engine, f"remerge:{follow.target}:{digest}"):
            return None  # another clock, or the webhook, got there first
        request = MergeRequest(
            recipe=recipe,
            target=follow.target,
            requester=follow.requester,
            origin="schedule",
            private=follow.private,
            follow_sources=True,
            discussion=follow.discussion,
            changes=tuple(moved),
        )
        try:
            identity = (  # with the token's organisations, and proof it still works
                self.service.identities.of(token) if token else Identity(name=follow.requester)
            )
            return self.service.submit(request, identity)
        except MergeError as error:
            self.stop(follow.target, f"the re-merge was refused: {error}")
            return None


def _follow(row: sa.Row) -> Follow:
    values = dict(row._mapping)
    values["sources"] = json.loads(values["sources"])
    return Follow(**values)
