"""Real processes for the service tests: the sandbox hub in this process (so a test can inject
faults and read which token asked for what), ``mergebot serve`` and ``mergebot worker`` as
subprocesses talking to it over HTTP, and small helpers to call the JSON API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from service.hub_client.hub import JOB_TRAILER
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

USERS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol", "tok-bot": "mergebot"}
BOT_TOKEN = "tok-bot"
SECRET_KEY = "zJAe3y1fJ6D0bqkAqR1oVu1PZXQ0Yzy3u5b8Q7mO5lE="  # a Fernet key for tests only
DEADLINE = 180.0  # seconds a job may take in these tests before they fail


def job_commits(hub_url: str, repo_id: str, token: str, job_id: str | None = None) -> list[str]:
    """The commits of ``repo_id`` that published a job (only ``job_id``'s, when given)."""
    marker = JOB_TRAILER.format(job_id=job_id) if job_id else JOB_TRAILER.split("{")[0]
    commits = HfApi(endpoint=hub_url, token=token).list_repo_commits(repo_id)
    return [c.commit_id for c in commits if marker in (c.message or "")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_sandbox(families: dict[str, tuple[Path, list[Path]]]) -> SandboxServer:
    """The sandbox hub, with ``owner/base``, ``owner/math``, ``owner/code`` for each owner."""
    server = SandboxServer(SandboxHub(HubStore(), users=dict(USERS))).__enter__()
    token_of = {user: token for token, user in USERS.items()}
    for owner, (base, (math, code, *_)) in families.items():
        api = HfApi(endpoint=server.url, token=token_of[owner])
        for name, folder in (("base", base), ("math", math), ("code", code)):
            api.create_repo(f"{owner}/{name}", private=owner == "carol")
            api.upload_folder(repo_id=f"{owner}/{name}", folder_path=folder)
    return server


class MergebotProcess:
    """``mergebot serve`` or ``mergebot worker`` (or ``command``) in a subprocess, its output in
    a log file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ):
        self.command = command or [sys.executable, "-m", "service.cli", *args]
        self.env, self.log_path, self.cwd = env, log, cwd
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, as when a machine dies."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def service_env(hub_url: str, work_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "MERGEBOT_"))
    }
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(work_dir / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_TOKEN=BOT_TOKEN,
        MERGEBOT_WORK_DIR=str(work_dir),
        MERGEBOT_SECRET_KEY=SECRET_KEY,
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def strict_json(body: bytes) -> Any:
    """JSON as the standard says: NaN and Infinity, which Python writes and reads by default,
    are not JSON, and a client in another language fails on them."""

    def refuse(constant: str) -> None:
        raise ValueError(f"the server answered {constant}, which is not JSON")

    return json.loads(body, parse_constant=refuse)


class Api:
    """The JSON API of a ``mergebot serve`` on ``port``."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def call(
        self, method: str, path: str, body: dict | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, strict_json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, strict_json(error.read() or b"null")

    def ready(self) -> bool:
        try:
            return self.call("GET", "/api/health")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def healthy_while(self, busy: Callable[[], bool], within: float = 1.0) -> int:
        """Ask ``/api/health`` again and again while ``busy()`` holds, each answer due within
        ``within`` seconds (an AssertionError if one is late); how many answered."""
        answered = 0
        while busy():
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=within) as response:
                    assert response.status == 200
            except (TimeoutError, urllib.error.URLError) as error:  # a timeout, or refused
                raise AssertionError(f"/api/health did not answer within {within} s") from error
            answered += 1
        return answered

    def submit(
        self, recipe: str, target: str, token: str | None = None, **options
    ) -> tuple[int, Any]:
        return self.call(
            "POST", "/api/jobs", {"recipe": recipe, "target": target, **options}, token
        )

    def job(self, job_id: str) -> dict:
        """Any job, seen with the bot's own token (the operator sees private ones too)."""
        return self.call("GET", f"/api/jobs/{job_id}", token=BOT_TOKEN)[1]

    def wait_done(self, job_id: str, deadline: float = DEADLINE) -> dict:
        def ended() -> dict | None:
            job = self.job(job_id)
            return job if job["status"] not in ("queued", "running") else None

        return wait_until(ended, f"job {job_id} to end", deadline)


def start_serve(
    hub_url: str, work_dir: Path, *args: str, **extra_env: str
) -> tuple[MergebotProcess, Api]:
    port = free_port()
    process = MergebotProcess(
        ["serve", "--port", str(port), *args],
        service_env(hub_url, work_dir, MERGEBOT_WORKER_ID="test-serve", **extra_env),
        work_dir.parent / f"{work_dir.name}-serve.log",
    )
    api = Api(port)
    wait_until(lambda: api.ready() or process.process.poll() is not None, "mergebot serve")
    assert api.ready(), process.log
    return process, api


def ties_recipe(owner: str) -> str:
    return f"""merge_method: ties
base_model: {owner}/base
models:
  - model: {owner}/math
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {owner}/code
    parameters: {{weight: 0.5, density: 0.5}}
"""
