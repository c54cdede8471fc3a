"""``/api/health`` latency while hostile requests are handled: ``mergebot serve`` against the
sandbox hub with a tiny model family, health asked ``--requests`` times one after another with
the bot idle, then again while five hostile requests run at once:

- a recipe whose ``discard:`` pattern backtracks for ever under Python's ``re`` (``([\\w.]+)+!``);
- a recipe with 5,000 ``discard:`` patterns;
- a recipe with one 200 KB ``discard:`` pattern;
- a discussion (watched repo, polled every second) whose comment has a yaml block and 60,000
  newlines, and one with an unclosed fence followed by 60,000 newlines;
- a search spec with 300 parameter filters, 3,000 fitness tasks and a ``wall_time`` padded
  with 50,000 spaces (230 KB, under the recipe size limit).

Prints p50, p99 and max of both phases, their ratios, and how each hostile request ended. A
health request that gets no answer within ``--timeout`` seconds counts as that long and is
reported; a hostile request still running after ``--hostile-timeout`` seconds is reported as
"did not answer" (on code where one freezes the server, the run then ends there).

    python benchmarks/bench_hostile_health.py [--requests 300] [--timeout 10] [--hostile-timeout 120]

Health is asked from a child process, so that it does not share a GIL with the sandbox hub in
this process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from bench_api_load import git_revision, percentile

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB, BOT = "tok-alice", "tok-bob", "tok-bot"
REQUESTS_REPO = "mergebot/requests"


# --- health, asked from a child process -----------------------------------------------------


def ask_health(port: int, count: int, timeout: float, stop, out) -> None:
    """``GET /api/health`` ``count`` times (or, once a tenth of them are done, until ``stop``
    is set), each on a new connection; puts the latencies in seconds (``timeout`` for one
    never answered)."""
    latencies: list[float] = []
    while len(latencies) < count and not (stop.is_set() and len(latencies) >= count // 10):
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            connection.request("GET", "/api/health", headers={"Connection": "close"})
            connection.getresponse().read()
            connection.close()
            latencies.append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException):
            latencies.append(max(timeout, time.perf_counter() - started))
    out.put(latencies)


def health_phase(port: int, count: int, timeout: float, until=None) -> list[float]:
    """Latencies of ``count`` health requests; with ``until`` (a callable), fewer once it is
    true (a tenth of them at least)."""
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    child = context.Process(target=ask_health, args=(port, count, timeout, stop, out))
    child.start()
    if until is not None:
        while child.is_alive() and not until():
            time.sleep(0.05)
        stop.set()
    latencies = out.get(timeout=count * timeout + 60)
    child.join(timeout=30)
    return latencies


def figures(latencies: list[float]) -> dict:
    return {
        "requests": len(latencies),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "max": max(latencies) * 1000,
    }


# --- the hostile requests -----------------------------------------------------------------------


def recipe_with(discard: list[str]) -> str:
    return (
        "merge_method: linear\nmodels:\n  - {model: alice/math, parameters: {weight: 0.5}}\n"
        f"  - {{model: alice/code, parameters: {{weight: 0.5}}}}\ndiscard: {json.dumps(discard)}\n"
    )


def big_spec() -> str:
    filters = json.dumps([f"layers.{i}." for i in range(300)])
    tasks = "".join(
        f"  - {{kind: nll, name: t{i}, data: {{examples: [a b c]}}}}\n" for i in range(3000)
    )
    return (
        "space: parameters\nmodels: [{model: alice/math}, {model: alice/code}]\n"
        f"base_model: alice/base\nparameters: {{filters: {filters}}}\nfitness:\n{tasks}"
        f"budget: {{trials: 4, wall_time: '1{' ' * 50_000}x'}}\n"
    )


def discussion(sandbox_url: str, deadline: float) -> str:
    """Two hostile discussions, then wait until the bot has answered the second's command
    (until ``deadline``, a ``time.monotonic()``)."""
    from huggingface_hub import HfApi

    bob = HfApi(endpoint=sandbox_url, token=BOB)
    block = "```yaml\n" + recipe_with([]) + "```\n"
    bob.create_discussion(REQUESTS_REPO, "Newlines", description=block + "\n" * 60_000 + "-")
    fence = bob.create_discussion(
        REQUESTS_REPO, "Fence", description="```yaml\n" + "\n" * 60_000 + "-"
    )
    bob.comment_discussion(REQUESTS_REPO, fence.num, "@mergebot retry")
    while time.monotonic() < deadline:
        events = bob.get_discussion_details(REQUESTS_REPO, fence.num).events
        said = [e.content for e in events if e.author == "mergebot"]
        if said:
            return f"answered: {said[0][:60]!r}"
        time.sleep(0.2)
    raise TimeoutError("no reply")


def answered(answer: tuple[int, dict]) -> str:
    status, body = answer
    text = body.get("error") or body.get("status") if isinstance(body, dict) else body
    return f"{status}: {str(text)[:70]}"


def hostile_requests(api, sandbox_url: str, deadline: float) -> dict:
    return {
        "backtracking discard": lambda: answered(
            api.submit(recipe_with([r"([\w.]+)+!"]), "alice/hostile", ALICE)
        ),
        "5,000 discard patterns": lambda: answered(
            api.submit(recipe_with(["^x"] * 5000), "alice/many", ALICE)
        ),
        "200 KB discard pattern": lambda: answered(
            api.submit(recipe_with(["a" * 200_000]), "alice/long", ALICE)
        ),
        "discussions: 60,000 newlines, unclosed fence": lambda: discussion(sandbox_url, deadline),
        "search spec: 300 filters, 3,000 tasks, padded wall_time": lambda: answered(
            api.call("POST", "/api/searches", {"spec": big_spec(), "target": "alice/s"}, ALICE)
        ),
    }


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from huggingface_hub import HfApi
    from service_env import start_sandbox, start_serve

    from merge_engine.example import make_family

    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ended: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        family = make_family(work / "models", "llama", finetunes=2)
        sandbox = start_sandbox({"alice": family})
        HfApi(endpoint=sandbox.url, token=BOT).create_repo(REQUESTS_REPO)
        serve = None
        pool = ThreadPoolExecutor(5)
        try:
            serve, api = start_serve(
                sandbox.url,
                work / "bot",
                MERGEBOT_MAX_QUEUED="1000",
                MERGEBOT_WATCH_REPOS=REQUESTS_REPO,
                MERGEBOT_DISCUSSION_POLL_SECONDS="1",
            )
            port = int(api.url.rsplit(":", 1)[1])
            health_phase(port, 20, args.timeout)  # warm-up, not counted
            idle = health_phase(port, args.requests, args.timeout)
            print("  idle phase done", file=sys.stderr, flush=True)
            started = time.monotonic()
            hostile = hostile_requests(api, sandbox.url, started + args.hostile_timeout)

            def timed(call) -> tuple[str, float]:
                return call(), time.monotonic() - started

            futures = {pool.submit(timed, call): name for name, call in hostile.items()}

            def over() -> bool:
                late = time.monotonic() - started > args.hostile_timeout
                return late or all(f.done() for f in futures)

            busy = health_phase(port, args.requests, args.timeout, until=over)
            wait(futures, timeout=max(0.0, args.hostile_timeout - (time.monotonic() - started)))
            for future, name in futures.items():
                if not future.done():
                    ended[name] = f"did not answer within {args.hostile_timeout:g} s"
                elif future.exception() is not None:
                    ended[name] = f"failed: {type(future.exception()).__name__}"
                else:
                    how, seconds = future.result()
                    ended[name] = f"{how} (after {seconds:.1f} s)"
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if serve is not None:
                serve.stop()
            sandbox.__exit__()
    report(when, args, figures(idle), figures(busy), ended)


def report(when: str, args: argparse.Namespace, idle: dict, busy: dict, ended: dict) -> None:
    print(f"## /api/health while hostile requests run ({when}, {git_revision()})\n")
    print(
        f"health asked one after another, each on a new connection, up to {args.requests} "
        f"times per phase; an unanswered one counts as {args.timeout:g} s\n"
    )
    print("| phase | requests | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, f in (("idle", idle), ("5 hostile requests at once", busy)):
        print(f"| {name} | {f['requests']} | {f['p50']:.1f} | {f['p99']:.1f} | {f['max']:.1f} |")
    print("\n| ratio (hostile / idle) | figure |")
    print("|---|---:|")
    for key in ("p50", "p99", "max"):
        print(f"| {key} | {busy[key] / idle[key]:.1f}× |")
    print("\n| hostile request | how it ended |")
    print("|---|---|")
    for name, how in ended.items():
        print(f"| {name} | {how.replace('|', '/')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="health requests per phase")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one health may take")
    parser.add_argument(
        "--hostile-timeout", type=float, default=120.0, help="seconds the hostile requests get"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the clean-up below runs
    run(args)


if __name__ == "__main__":
    main()
