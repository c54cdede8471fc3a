"""The jobs table: what each job is, where it stands, how it ended — readable from any process
(the API, the Space, ``mergebot jobs``, another machine's worker) through the same database
that holds the durable workflows. It records what people see; DBOS records what to resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[Status, ...] = ("queued", "running")
STAGES = ("pre-flight", "download", "merge", "verify", "card", "push")
LOG_LINES = 30

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
    sa.Column("card", sa.Text),
    sa.Column("request_recipe", sa.Text),
    sa.Column("discussion", sa.String(300)),
    sa.Column("changes", sa.Text),
    sa.Column("worker", sa.String(200)),
    sa.Column("merge_runs", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


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
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def workflow_id(self) -> str:
        """The durable workflow of this attempt (a failed job submitted again runs anew)."""
        return f"{self.id}.{self.attempt}"

    @property
    def progress(self) -> float:
        """The whole job's progress, 0 to 1: each stage an equal share, the merge's by tensor."""
        if self.status == "succeeded":
            return 1.0
        if self.stage not in STAGES:
            return 0.0
        return (STAGES.index(self.stage) + self.fraction) / len(STAGES)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.progress}


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
        metadata.create_all(engine, tables=[jobs_table])

    def add(self, job: Job) -> Job:
        """Insert ``job``, or replace a finished attempt of the same id with this new one."""
        now = time.time()
        job.created_at = job.updated_at = now
        row = _to_row(job)
        with self.engine.begin() as db:
            db.execute(jobs_table.delete().where(jobs_table.c.id == job.id))
            db.execute(jobs_table.insert().values(**row))
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
        query = sa.select(sa.func.count()).select_from(jobs_table).where(*where)
        with self.engine.connect() as db:
            return db.execute(query).scalar_one()

    def count_active(self, requester: str) -> int:
        return self._count(jobs_table.c.requester == requester, jobs_table.c.status.in_(ACTIVE))

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

    def has_target(self, target: str, requester: str) -> bool:
        """Whether ``requester`` already had a job pushing to ``target``."""
        return self._count(jobs_table.c.target == target, jobs_table.c.requester == requester) > 0

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

    def cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as db:
            return bool(
                db.execute(
                    sa.select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)
                ).scalar_one_or_none()
            )


def _to_row(job: Job) -> dict[str, Any]:
    row = asdict(job)
    row["sources"] = json.dumps(job.sources, sort_keys=True)
    row["log"] = json.dumps(job.log)
    row["changes"] = json.dumps(job.changes)
    return row


def _from_row(row: sa.Row) -> Job:
    values = dict(row._mapping)
    values["sources"] = json.loads(values["sources"])
    values["log"] = json.loads(values["log"])
    values["changes"] = json.loads(values["changes"] or "[]")
    return Job(**values)
