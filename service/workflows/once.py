"""Doing something once, whichever process sees it first: the clock in two processes, a webhook
and a poll, or one poll seeing an event twice. Inserting an event's key claims it; a second
insert of the same key fails, and that process leaves the event alone."""

from __future__ import annotations

import time

import sqlalchemy as sa

from service.workflows.job_store import metadata

events_table = sa.Table(
    "mergebot_events",
    metadata,
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("claimed_at", sa.Float, nullable=False),
)


def create_tables(engine: sa.Engine) -> None:
    metadata.create_all(engine, tables=[events_table])


def claim(engine: sa.Engine, key: str) -> bool:
    """True for the one caller that claims ``key`` first, False for every later one."""
    try:
        with engine.begin() as db:
            db.execute(events_table.insert().values(key=key, claimed_at=time.time()))
    except sa.exc.IntegrityError:
        return False
    return True
