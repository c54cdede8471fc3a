"""A throwaway PostgreSQL server for the tests: ``MERGEBOT_TEST_DATABASE_URL`` when one is
configured, otherwise ``initdb`` into a temporary folder and ``pg_ctl`` on a free port of
127.0.0.1 (as the ``postgres`` user when the tests run as root, since initdb refuses root)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from service_env import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        raise RuntimeError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")
    return found


def _run(*command: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *command], check=True, capture_output=True)


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    configured = os.environ.get("MERGEBOT_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    folder = Path(tempfile.mkdtemp(prefix="mergebot-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    _run(_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    _run(
        _binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"
    )
    try:
        _run(_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mergebot")
        yield f"postgresql://postgres@127.0.0.1:{port}/mergebot"
    finally:
        _run(_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
