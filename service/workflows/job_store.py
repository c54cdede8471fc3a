"""The jobs table: what each job is, where it stands, how it ended — readable from any process
(the API, the Space, ``mergebot jobs``, another machine's worker) through the same database
that holds the durable workflows. It records what people see; DBOS records what to resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from service.settings import SearchUse

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[Status, ...] = ("queued", "running")
Kind = Literal["merge", "search"]
STAGES = ("pre-flight", "download", "merge", "verify", "card", "push")
SEARCH_STAGES = ("pre-flight", "search", "verify", "push")
"""A search's trials and the writing of its winner (with its card) are one stage."""
LOG_LINES = 30
DAY = 24 * 3600

metadata = sa.MetaData()
jobs_table = sa.Table(
    "mergebot_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("requester", sa.String(200), nullable=False),
    sa.Column("origin", sa.String(20), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("private", sa.Boolean, nullable=False),
    sa.Column("follow_sources", sa.Boolean, nullable=False),
    sa.Column("recipe", sa.Text, nullable=False),
    sa.Column("sources", sa.Text, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("stage", sa.String(40), nullable=False),
    sa.Column("fraction", sa.Float, nullable=False),
    sa.Column("log", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("commit", sa.String(64)),
    sa.Column("url", sa.String(500)),
    sa.Column("output_bytes", sa.BigInteger),
    sa.Column("card", sa.Text),
    sa.Column("request_recipe", sa.Text),
    sa.Column("discussion", sa.String(300)),
    sa.Column("changes", sa.Text),
    sa.Column("worker", sa.String(200)),
    sa.Column("merge_runs", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("failure", sa.String(20)),
    sa.Column("auto_retried", sa.Boolean),
    sa.Column("kind", sa.String(20)),
    sa.Column("outcome", sa.Text),
    sa.Column("finish_early", sa.Boolean),
    sa.Column("trials_booked", sa.Integer),
    sa.Column("seconds_booked", sa.Float),
    sa.Column("search_seconds", sa.Float),
    sa.Column("turn_started", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

requester_locks = sa.Table(
    "mergebot_requester_locks",
    metadata,
    sa.Column("requester", sa.String(200), primary_key=True),
    sa.Column("touched_at", sa.Float, nullable=False),
)
"""One row per requester, written first by every submit: concurrent submits of one requester
(in any process, SQLite or PostgreSQL) queue behind it, so each counts the others' jobs."""

OUTAGE_RETRY_HOURS = 24
"""A job failed by a Hub outage runs again when the Hub answers within this many hours."""

SUMMARY_FIELDS = (
    "id", "kind", "attempt", "requester", "origin", "target", "private", "follow_sources", "discussion",
    "status", "stage", "fraction", "error", "url", "created_at", "updated_at",
)  # fmt: skip


@dataclass
class Job:
    id: str
    attempt: int
    requester: str
    origin: str
    target: str
    private: bool
    follow_sources: bool
    recipe: str
    """The pinned recipe (YAML) the worker merges: sources at commit SHAs, seed fixed."""
    sources: dict[str, str]
    """Each source repo and the commit it was pinned to."""
    status: Status = "queued"
    stage: str = "queued"
    fraction: float = 0.0
    log: list[str] = field(default_factory=list)
    error: str | None = None
    commit: str | None = None
    url: str | None = None
    output_bytes: int | None = None
    """The size of the published weights."""
    card: str | None = None
    """The model card (Markdown), once the card stage has written it."""
    request_recipe: str | None = None
    """The recipe as asked (references unpinned): what a re-merge merges again."""
    discussion: str | None = None
    """``type/namespace/name#num`` of the discussion that asked for this job, if any."""
    changes: list[str] = field(default_factory=list)
    """For a re-merge: which sources moved, ``repo: old → new``."""
    worker: str | None = None
    merge_runs: int = 0
    cancel_requested: bool = False
    failure: str | None = None
    """``hub_outage`` when the job failed because the Hub could not be reached."""
    auto_retried: bool = False
    """This attempt is the automatic one after an outage (there is no second)."""
    kind: Kind = "merge"
    """``search``: ``recipe`` is the pinned search spec, and the winner is what is pushed."""
    outcome: dict[str, Any] | None = None
    """A finished search's fitness table: ``{"rows": [{"model", "search", "held_out"}, ...]}``
    with the winner first."""
    finish_early: bool = False
    """The requester stopped the search and asked for the best candidate so far."""
    trials_booked: int | None = None
    """A search's trials, all stages: what its requester's daily trial limit counts."""
    seconds_booked: float | None = None
    """A search's wall time: what its requester's daily time limit counts while it is active."""
    search_seconds: float | None = None
    """The seconds a search has held a worker's search lane in its ended turns: what its
    ``wall_time`` and, once it ended, its requester's daily time limit count."""
    turn_started: float | None = None
    """When a search's current turn in the search lane began (POSIX seconds); None between
    turns."""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def workflow_id(self) -> str:
        """The durable workflow of this attempt (a failed job submitted again runs anew)."""
        return f"{self.id}.{self.attempt}"

    @property
    def stages(self) -> tuple[str, ...]:
        return SEARCH_STAGES if self.kind == "search" else STAGES

    @property
    def progress(self) -> float:
        """The whole job's progress, 0 to 1: each stage an equal share, the merge's by tensor
        and the search's by trial."""
        if self.status == "succeeded":
            return 1.0
        if self.stage not in self.stages:
            return 0.0
        return (self.stages.index(self.stage) + self.fraction) / len(self.stages)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.progress}

    def summary_json(self) -> dict[str, Any]:
        """What a list of jobs shows of each: no recipe, log or card, so a list stays small."""
        return {name: getattr(self, name) for name in SUMMARY_FIELDS} | {"progress": self.progress}


def make_engine(database_url: str) -> sa.Engine:
    """An engine for ``sqlite:///…`` or ``postgresql://…`` (driven by psycopg 3)."""
    if database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgresql://") :]
    if not database_url.startswith("sqlite"):
        return sa.create_engine(database_url, pool_pre_ping=True)
    engine = sa.create_engine(database_url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _wal(connection, _record) -> None:  # several processes share the file
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA busy_timeout=30000")

    return engine


class JobStore:
    def __init__(self, engine: sa.Engine):
        self.engine = engine
        metadata.create_all(engine, tables=[jobs_table, requester_locks])
        _add_missing_columns(engine, jobs_table)

    def add_within_limit(
        self, job: Job, limit: int, check_day: Callable[[SearchUse], None] | None = None
    ) -> Job | None:
        """Insert ``job`` as a new attempt (replacing an ended attempt of the same id) unless
        its requester already has ``limit`` jobs waiting or running; return the stored job,
        the existing one when the same job is already active or succeeded, or None when the
        limit is reached. ``check_day`` is given what the requester's other searches of the
        last 24 hours count and raises to refuse the job. One transaction that first writes
        the requester's lock row, so simultaneous submits count each other."""
        now = time.time()
        with self.engine.begin() as db:
            _lock_row(db, job.requester, now)
            row = db.execute(jobs_table.select().where(jobs_table.c.id == job.id)).first()
            existing = _from_row(row) if row else None
            if existing and (existing.status in ACTIVE or existing.status == "succeeded"):
                return existing
            active = db.execute(
                _count_of(jobs_table.c.requester == job.requester, jobs_table.c.status.in_(ACTIVE))
            ).scalar_one()
            if active >= limit:
                return None
            if check_day is not None:
                check_day(_searches_of_day(db, job.requester, job.id, now - DAY))
            job.attempt = existing.attempt + 1 if existing else 1
            job.created_at = job.updated_at = now
            db.execute(jobs_table.delete().where(jobs_table.c.id == job.id))
            db.execute(jobs_table.insert().values(**_to_row(job)))
        return job

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as db:
            row = db.execute(jobs_table.select().where(jobs_table.c.id == job_id)).first()
        return _from_row(row) if row else None

    def list(self, requester: str | None = None, limit: int = 50) -> list[Job]:
        query = jobs_table.select().order_by(jobs_table.c.created_at.desc()).limit(limit)
        if requester is not None:
            query = query.where(jobs_table.c.requester == requester)
        with self.engine.connect() as db:
            return [_from_row(row) for row in db.execute(query)]

    def _count(self, *where: Any) -> int:
        with self.engine.connect() as db:
            return db.execute(_count_of(*where)).scalar_one()

    def count_since(self, requester: str, origin: str, since: float) -> int:
        return self._count(
            jobs_table.c.requester == requester,
            jobs_table.c.origin == origin,
            jobs_table.c.created_at >= since,
        )

    def of_discussion(self, discussion: str) -> Job | None:
        """The latest job a discussion asked for."""
        query = (
            jobs_table.select()
            .where(jobs_table.c.discussion == discussion)
            .order_by(jobs_table.c.created_at.desc())
            .limit(1)
        )
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return _from_row(row) if row else None

    def requesters_of(self, target: str) -> set[str]:
        """Everyone who had a job pushing to ``target``."""
        query = sa.select(jobs_table.c.requester).where(jobs_table.c.target == target).distinct()
        with self.engine.connect() as db:
            return set(db.execute(query).scalars())

    def update_if(self, job_id: str, while_status: Status, **values: Any) -> bool:
        """Set columns only while the job is still ``while_status``; whether it was."""
        values["updated_at"] = time.time()
        with self.engine.begin() as db:
            done = db.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.status == while_status)
                .values(**values)
            )
        return done.rowcount == 1

    def update(self, job_id: str, log: str | None = None, **values: Any) -> None:
        """Set columns of ``job_id``; ``log`` appends a line to its recent log."""
        values["updated_at"] = time.time()
        with self.engine.begin() as db:
            if log is not None:
                current = db.execute(
                    sa.select(jobs_table.c.log).where(jobs_table.c.id == job_id)
                ).scalar_one_or_none()
                lines = [*json.loads(current or "[]"), log][-LOG_LINES:]
                values["log"] = json.dumps(lines)
            db.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(**values))

    def count_merge_run(self, job_id: str, worker: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id)
                .values(merge_runs=jobs_table.c.merge_runs + 1, worker=worker)
            )

    def failed_by_outage(self) -> list[Job]:
        """Jobs that failed because the Hub was unreachable and have not been run again."""
        query = jobs_table.select().where(awaits_outage_retry(time.time()))
        with self.engine.connect() as db:
            return [_from_row(row) for row in db.execute(query)]

    def requeue_after_outage(self, job_id: str) -> Job | None:
        """Make ``job_id`` a new, queued attempt marked as the automatic retry, if it is still
        failed by an outage and not retried (compare-and-set); the new attempt, or None."""
        with self.engine.begin() as db:
            done = db.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, awaits_outage_retry(time.time()))
                .values(
                    attempt=jobs_table.c.attempt + 1,
                    status="queued",
                    stage="queued",
                    fraction=0.0,
                    error=None,
                    failure=None,
                    auto_retried=True,
                    cancel_requested=False,
                    updated_at=time.time(),
                )
            )
        if done.rowcount != 1:
            return None
        self.update(job_id, log="the Hub answers again: running the job once more")
        return self.get(job_id)

    def running_searches(self) -> list[Job]:
        """Searches whose trials are being run now: any worker may help."""
        c = jobs_table.c
        query = jobs_table.select().where(
            c.kind == "search", c.status == "running", c.stage == "search"
        )
        with self.engine.connect() as db:
            return [_from_row(row) for row in db.execute(query)]

    def searching(self, worker: str) -> bool:
        """Whether ``worker``'s search lane runs a search now."""
        c = jobs_table.c
        return self._count(c.worker == worker, c.kind == "search", c.status == "running") > 0

    def search_waits(self, other_than: str) -> bool:
        """Whether a search other than ``other_than`` waits for a search lane: a new one, or
        one that gave its turn away."""
        c = jobs_table.c
        return self._count(c.kind == "search", c.status == "queued", c.id != other_than) > 0

    def searches_of_day(self, requester: str, other_than: str) -> SearchUse:
        """What ``requester``'s searches of the last 24 hours count, except ``other_than``'s."""
        with self.engine.connect() as db:
            return _searches_of_day(db, requester, other_than, time.time() - DAY)

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as db:
            return bool(
                db.execute(
                    sa.select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)
                ).scalar_one_or_none()
            )


def _searches_of_day(db: sa.Connection, requester: str, other_than: str, since: float) -> SearchUse:
    """What ``requester``'s searches created since ``since`` (except job ``other_than``) count
    against the daily limits: the trials each booked, and its wall time — all of it while it
    waits or runs, what it used once it ended. Read from columns, never from the stored specs."""
    c = jobs_table.c
    query = sa.select(c.status, c.trials_booked, c.seconds_booked, c.search_seconds).where(
        c.requester == requester, c.kind == "search", c.created_at >= since, c.id != other_than
    )
    trials, seconds = 0, 0.0
    for status, booked_trials, booked_seconds, used in db.execute(query):
        trials += booked_trials or 0
        booked = booked_seconds or 0.0
        seconds += booked if status in ACTIVE else min(booked, used or 0.0)
    return SearchUse(trials, seconds)


def _count_of(*where: Any) -> sa.Select:
    """How many jobs match ``where``, as a query to run in any connection or transaction."""
    return sa.select(sa.func.count()).select_from(jobs_table).where(*where)


def awaits_outage_retry(now: float) -> sa.ColumnElement[bool]:
    """Jobs that failed by a Hub outage, recently, and have not run again since."""
    c = jobs_table.c
    return sa.and_(
        c.status == "failed",
        c.failure == "hub_outage",
        sa.or_(c.auto_retried.is_(None), c.auto_retried.is_(False)),
        c.updated_at > now - OUTAGE_RETRY_HOURS * 3600,
    )


def _add_missing_columns(engine: sa.Engine, table: sa.Table) -> None:
    """Columns added to ``table`` since a database was made are added to it (nullable), so a
    bot upgraded in place keeps its jobs."""
    existing = {column["name"] for column in sa.inspect(engine).get_columns(table.name)}
    with engine.begin() as db:
        for column in table.columns:
            if column.name not in existing:
                kind = column.type.compile(dialect=engine.dialect)
                db.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _lock_row(db: sa.Connection, requester: str, now: float) -> None:
    """Write ``requester``'s lock row; it stays locked until the transaction ends."""
    dialect = postgresql if db.dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(requester_locks).values(requester=requester, touched_at=now)
    db.execute(upsert.on_conflict_do_update(index_elements=["requester"], set_={"touched_at": now}))


def _to_row(job: Job) -> dict[str, Any]:
    row = asdict(job)
    row["sources"] = json.dumps(job.sources, sort_keys=True)
    row["log"] = json.dumps(job.log)
    row["changes"] = json.dumps(job.changes)
    row["outcome"] = json.dumps(job.outcome) if job.outcome is not None else None
    return row


def _from_row(row: sa.Row) -> Job:
    values = dict(row._mapping)
    values["sources"] = json.loads(values["sources"])
    values["log"] = json.loads(values["log"])
    values["changes"] = json.loads(values["changes"] or "[]")
    values["auto_retried"] = bool(values["auto_retried"])
    values["kind"] = values["kind"] or "merge"
    values["outcome"] = json.loads(values["outcome"]) if values["outcome"] else None
    values["finish_early"] = bool(values["finish_early"])
    return Job(**values)
