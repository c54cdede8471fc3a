"""Load on the bot's JSON API while merges run: ``mergebot serve`` against the sandbox hub with a
tiny model family. Measures, for ``--seconds`` each, the unsigned ``GET /api/health`` and the
signed ``GET /api/jobs/{id}`` (``Authorization: Bearer tok-alice``) at concurrency 10 and 50
while bob's merges keep the worker busy (unless ``--no-merges``), then the merge drain rate of
``--jobs`` jobs without load, under unsigned health requests and under signed status requests,
each at concurrency 10. Absolute figures are noisy on a shared machine, so the signed figures
are compared with health's from the same server in the same run, the drain's included. Also counts the whoami calls (with alice's
token) that reached the sandbox hub in each phase. Prints Markdown tables.

    python benchmarks/bench_api_load.py [--seconds 10] [--jobs 8] [--no-merges] [--keep-alive]

The load runs in a child process (threads, each sending one request after another, each on a
new connection, or with ``--keep-alive`` on the thread's kept-alive one), so that it does not
share a GIL with the sandbox hub in this process.
"""

from __future__ import annotations

import argparse
import http.client
import math
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIGNED_TOKEN = "tok-alice"
FEEDER_TOKEN = "tok-bob"
WHOAMI = "/api/whoami-v2"


# --- the load, in a child process -----------------------------------------------------------


def load(
    port: int,
    path: str,
    token: str | None,
    concurrency: int,
    seconds: float,
    keep_alive: bool,
    stop,
    ready,
    out,
) -> None:
    """``concurrency`` threads sending ``GET path`` one after another for ``seconds`` or until
    ``stop`` is set; sets ``ready`` once they run, then puts ``{"latencies", "errors",
    "seconds"}`` on ``out``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if not keep_alive:
        headers["Connection"] = "close"
    latencies: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + seconds

    def client() -> None:
        connection = None
        while not stop.is_set() and time.monotonic() < end:
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                if not keep_alive:
                    connection.close()
                    connection = None
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as error:
                errors.append(type(error).__name__)
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()
    out.put({"latencies": latencies, "errors": errors, "seconds": time.monotonic() - started})


class Load:
    """One run of ``load`` in a child process: ``start()``, then ``result()`` (which stops it)."""

    context = multiprocessing.get_context("spawn")

    keep_alive = False  # set from --keep-alive

    def __init__(self, port: int, path: str, token: str | None, concurrency: int, seconds: float):
        self.stop, self.ready = self.context.Event(), self.context.Event()
        self.out = self.context.Queue()
        self.seconds = seconds
        self.process = self.context.Process(
            target=load,
            args=(port, path, token, concurrency, seconds, self.keep_alive)
            + (self.stop, self.ready, self.out),
            daemon=True,
        )

    def start(self) -> Load:
        self.process.start()
        if not self.ready.wait(120):
            raise RuntimeError("the load process did not start")
        return self

    def result(self, stop: bool = False) -> dict:
        if stop:
            self.stop.set()
        result = self.out.get(timeout=self.seconds + 120)  # before join: the queue feeds a pipe
        self.process.join(timeout=30)
        return result

    def kill(self) -> None:
        self.stop.set()
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


# --- figures ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summary(name: str, concurrency: int, result: dict, whoami: int) -> dict:
    latencies = result["latencies"]
    return {
        "name": name,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(result["errors"]),
        "error_kinds": sorted(set(result["errors"])),
        "rps": len(latencies) / result["seconds"],
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "whoami": whoami,
    }


def cpu_seconds(serve) -> float:
    """CPU time the ``mergebot serve`` process (API, worker and clock) has used so far."""
    import psutil

    times = psutil.Process(serve.process.pid).cpu_times()
    return times.user + times.system


def whoami_calls(sandbox, since: int) -> int:
    """Whoami calls with the signed load's token (alice's) since request number ``since``."""
    return sum(
        1
        for r in sandbox.hub.requests[since:]
        if r.path.rstrip("/") == WHOAMI and r.token == SIGNED_TOKEN
    )


def git_revision() -> str:
    try:
        return (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        return "?"


# --- the bot ------------------------------------------------------------------------------------


def submit_jobs(api, recipe: str, targets: list[str]) -> list[str]:
    ids = []
    for target in targets:
        status, job = api.submit(recipe, target, SIGNED_TOKEN)
        if status != 202:
            raise RuntimeError(f"submitting {target} answered {status}: {job}")
        ids.append(job["id"])
    return ids


def wait_succeeded(api, ids: list[str], deadline: float) -> None:
    """Poll the (unsigned, so no whoami) job list until every one of ``ids`` succeeded."""
    from service_env import wait_until

    def all_done() -> bool:
        status, jobs = api.call("GET", f"/api/jobs?requester=alice&limit={len(ids) + 50}")
        if status != 200:
            return False
        seen = {job["id"]: job for job in jobs if job["id"] in ids}
        fine = ("queued", "running", "succeeded")
        failed = [job for job in seen.values() if job["status"] not in fine]
        if failed:
            raise RuntimeError(f"job {failed[0]['id']} ended {failed[0]['status']}: {failed[0]}")
        return len(seen) == len(ids) and all(j["status"] == "succeeded" for j in seen.values())

    wait_until(all_done, f"{len(ids)} jobs to succeed", deadline)


class MergeFeeder:
    """Keeps ``depth`` of bob's jobs queued or running, so that merges run during the load
    phases; ``stop()`` waits until his last one has ended."""

    def __init__(self, api, recipe: str, depth: int = 2):
        self.api, self.recipe, self.depth = api, recipe, depth
        self.submitted, self.error = 0, None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._feed, name="merge-feeder", daemon=True)
        self.thread.start()

    def _active(self) -> int | None:
        status, jobs = self.api.call("GET", "/api/jobs?requester=bob&limit=20")
        if status != 200:
            return None
        for job in jobs:
            if job["status"] not in ("queued", "running", "succeeded"):
                raise RuntimeError(f"feeder job {job['id']} ended {job['status']}: {job}")
        return sum(job["status"] in ("queued", "running") for job in jobs)

    def _feed(self) -> None:
        try:
            while not self.stopping.is_set():
                active = self._active()
                for _ in range(self.depth - active if active is not None else 0):
                    target = f"bob/feed-{self.submitted}"
                    status, job = self.api.submit(self.recipe, target, FEEDER_TOKEN)
                    if status != 202:
                        raise RuntimeError(f"submitting {target} answered {status}: {job}")
                    self.submitted += 1
                self.stopping.wait(0.2)
        except Exception as error:  # noqa: BLE001  (raised again by stop())
            self.error = error

    def stop(self) -> int:
        """Stop feeding, wait for the queue to empty; the number of jobs fed."""
        from service_env import wait_until

        self.stopping.set()
        self.thread.join(timeout=120)
        if self.error is not None:
            raise self.error
        wait_until(lambda: self._active() == 0, "bob's jobs to end", 600)
        return self.submitted


DRAINS = {
    "without load": None,
    "under health load": ("/api/health", None),
    "under signed status load": ("{job}", SIGNED_TOKEN),
}
"""The drain's loads at concurrency 10: none, the same server's unsigned health (the baseline:
what any closed-loop load costs the merges on this machine), and signed job status."""


def drain(api, sandbox, recipe: str, label: str, jobs: int, port: int, job_path: str) -> dict:
    """Submit ``jobs`` distinct jobs and time them until all succeeded, under ``label``'s load."""
    background = None
    since = len(sandbox.hub.requests)
    if DRAINS[label] is not None:
        path, token = DRAINS[label]
        background = Load(port, path.format(job=job_path), token, 10, 3600).start()
    try:
        slug = label.replace(" ", "-")
        started = time.monotonic()
        ids = submit_jobs(api, recipe, [f"alice/drain-{slug}-{i}" for i in range(jobs)])
        wait_succeeded(api, ids, deadline=120 + 90 * jobs)
        elapsed = time.monotonic() - started
        load_figures = None
        if background is not None:
            load_figures = summary(
                f"drain {label}",
                10,
                background.result(stop=True),
                whoami_calls(sandbox, since),
            )
    finally:
        if background is not None:
            background.kill()
    return {
        "label": label,
        "jobs": jobs,
        "seconds": elapsed,
        "per_minute": jobs / elapsed * 60,
        "whoami": whoami_calls(sandbox, since),
        "load": load_figures,
    }


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from service_env import start_sandbox, start_serve, ties_recipe

    from merge_engine.example import make_family

    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        family = make_family(work / "models", "llama", finetunes=2)
        sandbox = start_sandbox({"alice": family, "bob": family})
        serve = None
        try:
            serve, api = start_serve(sandbox.url, work / "bot", MERGEBOT_MAX_QUEUED="1000")
            port = int(api.url.rsplit(":", 1)[1])
            recipe = ties_recipe("alice")
            status, job = api.submit(recipe, "alice/status-target", SIGNED_TOKEN)
            if status != 202:
                raise RuntimeError(f"the first job was refused with {status}: {job}")
            done = api.wait_done(job["id"], deadline=600)
            if done["status"] != "succeeded":
                raise RuntimeError(f"the first job ended {done['status']}: {done.get('error')}")
            job_path = f"/api/jobs/{job['id']}"

            Load(port, "/api/health", None, 10, 1.0).start().result()  # warm-up, not counted
            feeder = None if args.no_merges else MergeFeeder(api, ties_recipe("bob"))
            phases = []
            for concurrency in (10, 50):
                for name, path, token in (
                    ("health (unsigned)", "/api/health", None),
                    ("job status (signed)", job_path, SIGNED_TOKEN),
                ):
                    since, cpu = len(sandbox.hub.requests), cpu_seconds(serve)
                    result = Load(port, path, token, concurrency, args.seconds).start().result()
                    phases.append(summary(name, concurrency, result, whoami_calls(sandbox, since)))
                    phases[-1]["server_cpu"] = cpu_seconds(serve) - cpu
                    print(
                        f"  {name} at {concurrency}: {phases[-1]['rps']:.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
            merged = feeder.stop() if feeder else 0
            drains = []
            for label in DRAINS:
                drains.append(drain(api, sandbox, recipe, label, args.jobs, port, job_path))
                print(
                    f"  drain {label}: {drains[-1]['per_minute']:.1f} jobs/min",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception:
            if serve is not None:
                print(f"--- mergebot serve log (tail) ---\n{serve.log[-4000:]}", file=sys.stderr)
            raise
        finally:
            if serve is not None:
                serve.stop()
            sandbox.__exit__()
    report(when, args, phases, drains, merged)


def report(
    when: str, args: argparse.Namespace, phases: list[dict], drains: list[dict], merged: int
) -> None:
    print(f"## API load while merges run ({when}, {git_revision()})\n")
    during = f"{merged} of bob's merges ran during them" if merged else "no merges ran"
    connections = "kept-alive connections" if args.keep_alive else "a new connection per request"
    print(
        f"{args.seconds:g} s per load phase, {during}; drain of {args.jobs} jobs each; "
        f"{connections}\n"
    )
    print(
        "| phase | concurrency | requests | errors | req/s | p50 ms | p99 ms | whoami at hub "
        "| server CPU ms per request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = phases + [d["load"] for d in drains if d["load"]]
    for p in rows:
        kinds = f" ({', '.join(p['error_kinds'])})" if p["errors"] else ""
        cpu = f"{p['server_cpu'] * 1000 / p['requests']:.2f}" if "server_cpu" in p else ""
        print(
            f"| {p['name']} | {p['concurrency']} | {p['requests']} | {p['errors']}{kinds} "
            f"| {p['rps']:.0f} | {p['p50']:.1f} | {p['p99']:.1f} | {p['whoami']} | {cpu} |"
        )
    by = {(p["name"].split()[0], p["concurrency"]): p for p in phases}
    print("\n| comparison | figure | target |")
    print("|---|---:|---|")
    for concurrency in (10, 50):
        health, signed = by[("health", concurrency)], by[("job", concurrency)]
        rps_ratio = signed["rps"] / health["rps"] if health["rps"] else math.nan
        p99_ratio = signed["p99"] / health["p99"] if health["p99"] else math.nan
        rps_target = "≥ 0.60" if concurrency == 10 else ""
        p99_target = "≤ 2.0" if concurrency == 10 else ""
        print(f"| signed / health req/s at {concurrency} | {rps_ratio:.2f}× | {rps_target} |")
        print(f"| signed / health p99 at {concurrency} | {p99_ratio:.2f}× | {p99_target} |")
    print(f"| signed p99 at 50 | {by[('job', 50)]['p99']:.0f} ms | < 500 ms |")
    print("\n| drain | jobs | seconds | jobs/min | whoami at hub |")
    print("|---|---:|---:|---:|---:|")
    for d in drains:
        print(
            f"| {d['label']} | {d['jobs']} | {d['seconds']:.1f} | {d['per_minute']:.1f} "
            f"| {d['whoami']} |"
        )
    idle, health, signed = (d["per_minute"] for d in drains)
    print(f"\nmerges slowed by health load (baseline): {(1 - health / idle) * 100:.0f} %")
    print(f"merges slowed by signed status load: {(1 - signed / idle) * 100:.0f} % (target ≤ 20 %)")
    signed_whoami = sum(p["whoami"] for p in phases if p["name"].startswith("job"))
    signed_requests = sum(p["requests"] for p in phases if p["name"].startswith("job"))
    print(
        f"whoami calls at the sandbox hub during the signed status phases: {signed_whoami} "
        f"for {signed_requests} signed requests"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--jobs", type=int, default=8, help="jobs per drain measurement")
    parser.add_argument(
        "--no-merges", action="store_true", help="measure the API phases with the worker idle"
    )
    parser.add_argument(
        "--keep-alive", action="store_true", help="each client thread keeps its connection open"
    )
    args = parser.parse_args()
    Load.keep_alive = args.keep_alive
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the clean-up below runs
    run(args)


if __name__ == "__main__":
    main()
