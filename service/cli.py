"""The ``mergebot`` command: the engine's commands plus the service's: ``serve`` (API, worker
and clock in one process), ``worker``, ``submit``, ``jobs``, ``sandbox-hub``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from merge_engine.cli import build_parser, table_lines
from merge_engine.cli import main as engine_main


def cmd_sandbox_hub(args: argparse.Namespace) -> None:
    from service.demo import seed_examples
    from service.sandbox_hub import HubStore, SandboxHub, SandboxServer
    from service.server import quiet_libraries

    quiet_libraries()  # seeding saves models: no progress bars or optional-backend warnings
    store = HubStore(Path(args.data) if args.data else None)
    token = args.token or f"hf_sandbox_{secrets.token_hex(8)}"
    hub = SandboxHub(store, users={token: args.user})
    seeded = seed_examples(store, args.user) if args.seed else []
    with SandboxServer(hub, port=args.port) as server:
        print(f"sandbox hub on {server.url}; user {args.user}", flush=True)
        if not args.token:  # a throwaway credential of this local server, not of any real account
            print(f"use it with: HF_ENDPOINT={server.url} HF_TOKEN={token}", flush=True)
        if seeded:
            print("example models: " + ", ".join(seeded), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.thread.join()


def cmd_serve(args: argparse.Namespace) -> None:
    from service.server import run_web, start_bot

    service = start_bot(args.hub_port, run_jobs=not args.no_worker)
    # after start_bot: it may set HF_ENDPOINT for the demo
    from service.space.ui import build_blocks

    run_web(service, build_blocks, args.host, args.port)


def _start_jobs(role: str, worker_id: str | None, run_jobs: bool):
    """The job service of a ``worker`` or ``tick`` process, with DBOS launched."""
    from service.intake.jobs import JobService
    from service.server import quiet_libraries
    from service.settings import Settings
    from service.workflows.worker import start_dbos

    quiet_libraries()
    settings = Settings.from_env()
    settings = replace(settings, worker_id=worker_id or settings.worker_id).for_role(role)
    service = JobService(settings)
    start_dbos(service, run_jobs=run_jobs)
    return service


def cmd_worker(args: argparse.Namespace) -> None:
    from service.workflows.worker import stop_dbos

    service = _start_jobs("worker", args.id, run_jobs=True)
    print(f"mergebot worker {service.settings.worker_id} waiting for jobs", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    stop_dbos(service)


def cmd_tick(args: argparse.Namespace) -> None:
    from service.intake.clock import tick
    from service.workflows.worker import stop_dbos

    tick(_start_jobs("tick", args.id, run_jobs=False))
    stop_dbos()


def _call_api(server: str, method: str, path: str, body: dict | None = None) -> dict | list:
    """One JSON call to a running ``mergebot serve``, signed with the caller's Hub token."""
    from huggingface_hub import get_token

    request = urllib.request.Request(
        server.rstrip("/") + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    # HF_TOKEN set but empty asks without a token, even when a login is saved
    token = os.environ["HF_TOKEN"] if "HF_TOKEN" in os.environ else get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", error.reason)
        raise SystemExit(f"error: {detail}") from None
    except urllib.error.URLError as error:
        raise SystemExit(
            f"error: no mergebot server answers at {server} ({error.reason}); start one with `mergebot serve` or pass --server"
        ) from None


def _follow(server: str, job: dict) -> dict:
    """Show a job's progress until it ends."""
    from tqdm import tqdm

    with tqdm(total=100, desc=job["stage"], unit="%") as bar:
        while job["status"] in ("queued", "running"):
            time.sleep(0.5)
            job = _call_api(server, "GET", f"/api/jobs/{job['id']}")
            bar.set_description(job["stage"])
            bar.update(round(job["progress"] * 100) - bar.n)
    return job


def cmd_submit(args: argparse.Namespace) -> None:
    try:
        recipe = Path(args.recipe).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(
            f"error: cannot read the recipe file {args.recipe} ({type(error).__name__}); check the path"
        ) from None
    if _is_search(recipe):
        if args.follow:
            raise SystemExit("error: a search is not re-run when its sources move; drop --follow")
        body = {"spec": recipe, "target": args.to, "private": args.private}
        job = _call_api(args.server, "POST", "/api/searches", body)
    else:
        body = {
            "recipe": recipe,
            "target": args.to,
            "private": args.private,
            "follow_sources": args.follow,
        }
        job = _call_api(args.server, "POST", "/api/jobs", body)
    print(f"{job['id']}: {job['status']} ({job['target']})")
    if args.wait:
        job = _follow(args.server, job)
        print(f"{job['id']}: {job['status']}" + (f" {job['url']}" if job["url"] else ""))
        if job["error"]:
            raise SystemExit(f"error: {job['error']}")


def _is_search(text: str) -> bool:
    """Whether the file is a search spec (the server reads either within its limits)."""
    import yaml

    from service.intake.request import is_search_spec

    try:
        return is_search_spec(yaml.safe_load(text))
    except yaml.YAMLError:
        return False  # the server names the problem


def cmd_jobs(args: argparse.Namespace) -> None:
    if args.id:
        job = _call_api(args.server, "GET", f"/api/jobs/{args.id}")
        for key in ("id", "status", "stage", "fraction", "requester", "target", "url", "error"):
            print(f"{key:>10}: {job[key]}")
        print("       log:\n" + "\n".join(f"  {line}" for line in job["log"]))
        return
    print("\n".join(jobs_table(_call_api(args.server, "GET", "/api/jobs"))))


def jobs_table(jobs: list[dict]) -> list[str]:
    """``mergebot jobs``: one row per job under a header, the columns aligned whatever the
    lengths of ids (``job-…``, ``search-…``), stages and targets."""
    rows = [["id", "status", "stage", "done", "target"]]
    rows += [
        [job["id"], job["status"], job["stage"], f"{job['fraction']:.0%}", job["target"]]
        for job in jobs
    ]
    return table_lines(rows) if jobs else ["no jobs yet; send one with `mergebot submit`"]


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    default_server = os.environ.get("MERGEBOT_SERVER", "http://127.0.0.1:7860")
    serve = sub.add_parser(
        "serve",
        help="run the bot: the Space's UI, the JSON API, a worker and the clock (without HF_TOKEN, on the sandbox hub)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument(
        "--hub-port", type=int, default=7861, help="the sandbox hub's port, without HF_TOKEN"
    )
    serve.add_argument("--no-worker", action="store_true", help="queue jobs for other workers only")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a standalone worker (another machine, another GPU)")
    worker.add_argument(
        "--id", help="this worker's stable id (default: MERGEBOT_WORKER_ID or <host>-worker0)"
    )
    worker.set_defaults(func=cmd_worker)

    clock = sub.add_parser(
        "tick", help="run the clock once: poll discussions, check followed sources, sweep"
    )
    clock.add_argument("--id", help="this process's id (default: <host>-tick)")
    clock.set_defaults(func=cmd_tick)

    submit = sub.add_parser(
        "submit", help="send a recipe or a search spec to a running mergebot server"
    )
    submit.add_argument("recipe", help="the recipe (or evolutionary search spec) YAML file")
    submit.add_argument("--to", required=True, help="the repo to push the merge to: namespace/name")
    submit.add_argument("--private", action="store_true")
    submit.add_argument(
        "--follow", action="store_true", help="merge again when a source model changes"
    )
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument(
        "--server", default=default_server, help="default: MERGEBOT_SERVER or %(default)s"
    )
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list the recent jobs of a mergebot server, or show one")
    jobs.add_argument("id", nargs="?")
    jobs.add_argument("--server", default=default_server)
    jobs.set_defaults(func=cmd_jobs)

    hub = sub.add_parser(
        "sandbox-hub", help="run a Hub-compatible server on 127.0.0.1 (tests and the offline demo)"
    )
    hub.add_argument("--port", type=int, default=7861, help="0 picks a free port")
    hub.add_argument("--data", help="folder that keeps repos across restarts (default: in memory)")
    hub.add_argument(
        "--seed",
        action="store_true",
        help="add the example models: a tiny Llama base, USER/base, and its three fine-tunes, "
        "USER/math, USER/code and USER/chat, and a LoRA adapter of it, USER/math-lora; a tiny SD1.5 pipeline, USER/sd-base, and its two "
        "fine-tunes, USER/sd-dreamy and USER/sd-photo",
    )
    hub.add_argument(
        "--user", default="demo", help="the user that owns the example models and the token"
    )
    hub.add_argument("--token", help="the user's token (default: a random one, printed)")
    hub.set_defaults(func=cmd_sandbox_hub)


def main(argv: list[str] | None = None) -> int:
    return engine_main(argv, build_parser(add_service_commands))


if __name__ == "__main__":
    sys.exit(main())
