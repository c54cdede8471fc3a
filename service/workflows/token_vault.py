"""Requesters' Hub tokens, kept only while their job needs them: encrypted at rest (Fernet:
AES-128-CBC with an HMAC), erased when the job ends. Nothing else in the database, the logs or
the workflow inputs ever holds a token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from merge_engine.errors import MergeError
from service.workflows.job_store import ACTIVE, awaits_outage_retry, jobs_table, metadata

tokens_table = sa.Table(
    "mergebot_tokens",
    metadata,
    # a job id, or ``follow:<target>`` for a merge that follows its sources
    sa.Column("job_id", sa.String(300), primary_key=True),
    sa.Column("ciphertext", sa.Text, nullable=False),
)
KEY_FILE = "secret.key"


def load_key(secret_key: str | None, work_dir: Path, shared_database: bool) -> bytes:
    """The encryption key: ``MERGEBOT_SECRET_KEY``, or a key file made once in the work dir.
    Workers that share a PostgreSQL database run on several machines, so there the key must
    come from the environment, the same on all of them."""
    if secret_key:
        return secret_key.encode()
    if shared_database:
        raise MergeError(
            "set MERGEBOT_SECRET_KEY (a Fernet key, e.g. from `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`) the same on every worker that shares the PostgreSQL database"
        )
    path = work_dir / KEY_FILE
    if not path.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(Fernet.generate_key())
    return path.read_bytes().strip()


class TokenVault:
    def __init__(self, engine: sa.Engine, key: bytes):
        self.engine = engine
        self.fernet = Fernet(key)
        metadata.create_all(engine, tables=[tokens_table])

    def put(self, job_id: str, token: str) -> None:
        ciphertext = self.fernet.encrypt(token.encode()).decode()
        with self.engine.begin() as db:
            db.execute(tokens_table.delete().where(tokens_table.c.job_id == job_id))
            db.execute(tokens_table.insert().values(job_id=job_id, ciphertext=ciphertext))

    def get(self, job_id: str) -> str | None:
        with self.engine.connect() as db:
            ciphertext = db.execute(
                sa.select(tokens_table.c.ciphertext).where(tokens_table.c.job_id == job_id)
            ).scalar_one_or_none()
        if ciphertext is None:
            return None
        try:
            return self.fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise MergeError(
                "the stored token of this job cannot be decrypted: MERGEBOT_SECRET_KEY differs from the one that stored it; use the same key on every worker and submit the job again"
            ) from None

    def erase(self, job_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(tokens_table.delete().where(tokens_table.c.job_id == job_id))

    def erase_of_ended_jobs(self) -> None:
        """Erase the tokens of every job that has ended, in one statement: a job submitted
        meanwhile is queued, so its token stays; follow tokens belong to no job and stay; a job
        that failed by a Hub outage keeps its token while it may still run again."""
        ended = sa.select(jobs_table.c.id).where(
            jobs_table.c.status.not_in(ACTIVE), sa.not_(awaits_outage_retry(time.time()))
        )
        with self.engine.begin() as db:
            db.execute(tokens_table.delete().where(tokens_table.c.job_id.in_(ended)))
