"""Searches as bot jobs: trials per hour with one and with two ``mergebot worker`` processes on
one machine for the same search, the time from the last trial to the published commit, and how
fast the job table and a search's plot refresh while a search runs.

    python benchmarks/bench_search_jobs.py [--work /tmp/mergebot-bench-search-jobs] [--small]

The setup: the sandbox hub in this process with a Llama-style family (a base and two
"fine-tunes", each the base plus a small random task vector, with the tiny character
tokenizer), a throwaway PostgreSQL server (``tests/postgres_server.py``), ``mergebot serve
--no-worker`` for the API and ``mergebot worker`` processes, every worker with
OMP_NUM_THREADS=1. The search: ``space: parameters`` (TIES, the default genes), one ``nll``
task of inline random lowercase texts. Everything shares this machine's cores, so the load
average is printed too.

What it measures, with its target:

1. trials per hour of the same search, (a) one worker, (b) two workers (the second one helps
   the search the first one runs). Wall-clock throughput comes from the trials' timestamps in
   the search's study (the bot's database, which GET /api/searches/{id} reads too): completed
   trials over the time from the first trial's start to the last trial's end, as
   ``bench_evolve.py`` counts a stage, and over the first and the last third of the trials.
   Beside it: the trials' own ``seconds`` (merge + evaluation), the trials per worker, when
   the second worker began its first trial and the rate from then on, how busy the workers
   were (trial seconds over workers x study wall: what the product loses between trials) and
   the CPU they got (what the machine gave them). Target: two / one close to 2x on 2 cores.
   The searches are not polled through GET /api/searches/{id} while they run: that call
   costs the API process tenths of a second of CPU (item 3), which on a 2-core machine would
   slow the workers it measures.
2. the time from the last trial to the published commit: from the last trial's end in the
   study to the first poll of GET /api/jobs/{id} (every 50 ms; a cheap, cached read) that
   shows the job ``succeeded`` (its commit pushed), split with the job log's ``verify: done
   in`` and ``push: done in`` lines; the rest is the end of the search step (the final table,
   writing the winner, its card and plot) and the queue's bookkeeping.
3. refresh rate under a running search: N back-to-back calls of GET /api/jobs (the job
   table) and GET /api/searches/{id} (what the plot polls) of the finished two-worker search
   with no search running, then the same calls while a third search runs on both workers,
   plus that running search's own status; median and p95 latency, refreshes per second
   (calls over their total time) and the ratio loaded / idle. Target: the page stays
   responsive (ratio near 1, well over one refresh per second).

``--small`` runs the same on a tiny model in about a minute, to check the script.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from postgres_server import postgres_url  # noqa: E402
from service_env import (  # noqa: E402
    Api,
    MergebotProcess,
    service_env,
    start_sandbox,
    start_serve,
    wait_until,
)

ALICE = "tok-alice"
LETTERS = "abcdefghijklmnopqrstuvwxyz "
LIMITS = {"MERGEBOT_MAX_SEARCH_TRIALS": "100000", "MERGEBOT_SEARCH_TRIALS_DAILY": "1000000"}
"""The third search runs until it is cancelled: no limit may refuse it."""


@dataclass(frozen=True)
class Mode:
    """The model family, the search and the number of timed calls of one run."""

    model: dict
    trials: int
    examples: int  # nll texts
    chars: int  # characters per text
    calls: int  # per endpoint and condition
    deadline: float  # seconds one search may take


MODES = {
    "full": Mode(
        model=dict(
            hidden_size=320,
            intermediate_size=864,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=96,
            max_position_embeddings=128,
        ),
        trials=60,
        examples=64,
        chars=64,
        calls=200,
        deadline=1800,
    ),
    "small": Mode(model={}, trials=12, examples=16, chars=16, calls=30, deadline=300),
}


# The models, the spec and the processes


def make_models(folder: Path, mode: Mode) -> tuple[Path, list[Path]]:
    """The base and two fine-tunes (base + random task vector of std 0.002), with tokenizers."""
    from merge_engine.example import make_family, save_tiny_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    base, tuned = make_family(folder, "llama", finetunes=2, scale=0.002, **mode.model)
    for model in (base, *tuned):
        save_tiny_tokenizer(model)
    return base, tuned


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    count = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                count += math.prod(handle.get_slice(name).get_shape())
    return count


def spec_text(mode: Mode, trials: int, seed: int = 0) -> str:
    """A ``parameters`` search of alice's family, scored on one ``nll`` task."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(LETTERS) for _ in range(mode.chars)) for _ in range(mode.examples)]
    spec = {
        "space": "parameters",
        "models": [{"model": "alice/math"}, {"model": "alice/code"}],
        "base_model": "alice/base",
        "fitness": [{"name": "text", "kind": "nll", "data": {"examples": texts}}],
        "budget": {"trials": trials},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def start_worker(hub_url: str, work: Path, name: str, settings: dict[str, str]) -> MergebotProcess:
    """A ``mergebot worker`` with one torch thread, returned once its queue listens."""
    env = service_env(hub_url, work / name, OMP_NUM_THREADS="1", **settings)
    worker = MergebotProcess(["worker", "--id", name], env, work / f"{name}.log")
    try:
        wait_until(
            lambda: "waiting for jobs" in worker.log or worker.process.poll() is not None,
            f"{name} to start",
        )
        assert worker.process.poll() is None, worker.log
    except AssertionError:
        worker.stop()
        raise
    return worker


def submit(api: Api, spec: str, target: str) -> str:
    status, job = api.call("POST", "/api/searches", {"spec": spec, "target": target}, ALICE)
    assert status == 202, job
    return job["id"]


# 1 and 2: one search, from its submission to its commit


@dataclass(frozen=True)
class Trial:
    """One completed trial as the study in the database holds it (POSIX seconds)."""

    start: float
    end: float
    seconds: float  # the trial's own: merge + evaluation
    worker: str


@dataclass
class SearchRun:
    """One search: when it was submitted and seen published, its job and its trials."""

    label: str
    submitted: float
    ended: float  # the first poll of GET /api/jobs/{id} showing it succeeded
    job: dict
    trials: list[Trial]
    cpu: float  # CPU seconds the workers used from submission to commit
    load: float  # the 1-minute load average at the end

    @property
    def cores(self) -> float:
        """Cores the workers kept busy from submission to commit."""
        return self.cpu / (self.ended - self.submitted)

    @property
    def busy(self) -> float:
        """The share of the study wall each worker spent in its trials' own seconds."""
        workers = len({t.worker for t in self.trials})
        return sum(t.seconds for t in self.trials) / (workers * (self.last - self.first))

    @property
    def first(self) -> float:
        return min(t.start for t in self.trials)

    @property
    def last(self) -> float:
        return max(t.end for t in self.trials)

    @property
    def per_hour(self) -> float:
        return 3600 * len(self.trials) / (self.last - self.first)

    @property
    def mean_seconds(self) -> float:
        return statistics.fmean(t.seconds for t in self.trials)

    def thirds(self) -> tuple[float, float]:
        """Trials per hour over the first and over the last third of the trials."""
        ordered = sorted(self.trials, key=lambda t: t.end)
        third = len(ordered) // 3
        early, late = ordered[:third], ordered[-third:]
        return (
            3600 * third / (early[-1].end - self.first),
            3600 * third / (late[-1].end - ordered[-third - 1].end),
        )

    def per_worker(self) -> list[int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.worker] = counts.get(trial.worker, 0) + 1
        return sorted(counts.values(), reverse=True)

    def join_note(self) -> str:
        """When the second worker began its first trial, and the rate from then on."""
        starts: dict[str, float] = {}
        for trial in sorted(self.trials, key=lambda t: t.start):
            starts.setdefault(trial.worker, trial.start)
        if len(starts) < 2:
            return "; no trial by a 2nd worker"
        joined = sorted(starts.values())[1]
        after = sum(t.start >= joined for t in self.trials)
        rate = 3600 * after / (self.last - joined)
        return (
            f"; 2nd worker's 1st trial began {joined - self.first:.1f} s after the 1st, "
            f"{rate:,.0f} trials/h from then"
        )

    def stage_seconds(self, stage: str) -> float:
        """Seconds of ``stage`` from the job log's ``STAGE: done in X s`` line."""
        for line in self.job["log"]:
            found = re.fullmatch(rf"{stage}: done in ([\d.]+) s", line)
            if found:
                return float(found[1])
        raise AssertionError(f"no '{stage}: done in' line in the log: {self.job['log']}")


def stored_trials(database: str, job_id: str) -> list[Trial]:
    """The completed trials of the search ``job_id``, read from its study in the database."""
    import optuna
    from optuna.trial import TrialState

    from merge_engine.evolve.search import StudyNames
    from merge_engine.evolve.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=StudyNames(job_id).of("parameters"), storage=open_storage(database)
    )
    return [
        Trial(
            t.datetime_start.timestamp(),
            t.datetime_complete.timestamp(),
            t.user_attrs["seconds"],
            t.user_attrs["worker"],
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]


def cpu_seconds(processes: list[MergebotProcess]) -> float:
    """User and system CPU seconds the processes have used so far."""
    import psutil

    times = [psutil.Process(p.process.pid).cpu_times() for p in processes]
    return sum(t.user + t.system for t in times)


def run_search(
    api: Api, database: str, workers: list[MergebotProcess], label: str, spec: str, mode: Mode
) -> SearchRun:
    print(f"  {label} ...", flush=True)
    submitted, cpu = time.time(), cpu_seconds(workers)
    job_id = submit(api, spec, f"alice/bench-{len(workers)}-workers")
    job = api.wait_done(job_id, mode.deadline)  # GET /api/jobs/{id} every 50 ms
    ended, cpu = time.time(), cpu_seconds(workers) - cpu
    trials = stored_trials(database, job_id)
    search = SearchRun(label, submitted, ended, job, trials, cpu, os.getloadavg()[0])
    assert job["status"] == "succeeded", job
    assert len(trials) == mode.trials, f"{len(trials)} trials of {mode.trials}"
    print(
        f"    {search.per_hour:,.0f} trials/h; {search.mean_seconds:.2f} s a trial; "
        f"last trial to commit {search.ended - search.last:.1f} s",
        flush=True,
    )
    return search


# 3: refresh rate


@dataclass(frozen=True)
class Timing:
    """Back-to-back calls of one endpoint."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.seconds, n=20)[-1]

    @property
    def rate(self) -> float:
        return len(self.seconds) / sum(self.seconds)


def time_endpoints(api: Api, paths: dict[str, str], calls: int) -> dict[str, Timing]:
    """``calls`` rounds of one call of each path in turn: each sees the same conditions."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(calls):
        for name, path in paths.items():
            started = time.perf_counter()
            status, body = api.call("GET", path, token=ALICE)
            seconds[name].append(time.perf_counter() - started)
            assert status == 200, body
    return {name: Timing(values) for name, values in seconds.items()}


def trials_done(api: Api, job_id: str) -> int:
    return api.call("GET", f"/api/searches/{job_id}", token=ALICE)[1]["done"]


def under_a_running_search(
    api: Api, spec: str, measure: Callable[[str], dict[str, Timing]]
) -> tuple[dict[str, Timing], tuple[int, int]]:
    """``measure(job_id)`` while a search runs on both workers, then cancel that search.
    Returns the timings and the trials that search had done before and after them."""
    job_id = submit(api, spec, "alice/bench-loaded")

    def both_workers() -> bool:
        trials = api.call("GET", f"/api/searches/{job_id}", token=ALICE)[1]["trials"]
        return len({t["worker"] for t in trials}) == 2

    wait_until(both_workers, "both workers to run trials of the third search", 600)
    before = trials_done(api, job_id)
    timings = measure(job_id)
    after = trials_done(api, job_id)
    assert api.job(job_id)["status"] == "running", "the third search ended while it was timed"
    assert api.call("POST", f"/api/jobs/{job_id}/cancel", token=ALICE)[0] == 200
    assert api.wait_done(job_id)["status"] == "cancelled"
    return timings, (before, after)


# The tables


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for name, figure, note in rows:
        print(f"{name:<{width}}  {figure:>{value}}  {note}")


def throughput_rows(one: SearchRun, two: SearchRun) -> list[tuple[str, str, str]]:
    rows = []
    for search in (one, two):
        early, late = search.thirds()
        rows += [
            (
                f"{search.label}: trials/h (study wall)",
                f"{search.per_hour:,.0f}",
                f"{len(search.trials)} trials in {search.last - search.first:.1f} s; per worker "
                f"{search.per_worker()}{search.join_note()}",
            ),
            (
                f"{search.label}: first / last third",
                f"{early:,.0f} / {late:,.0f}",
                "trials/h over the first and the last third of the trials",
            ),
            (
                f"{search.label}: seconds a trial",
                f"{search.mean_seconds:.2f} s",
                f"the trials' own (merge + evaluation); study wall "
                f"{(search.last - search.first) / len(search.trials):.2f} s a trial; submit to "
                f"1st trial {search.first - search.submitted:.1f} s",
            ),
            (
                f"{search.label}: workers busy",
                f"{search.busy:.0%}",
                f"trial seconds / (workers x study wall); their CPU {search.cores:.2f} cores from "
                f"submit to commit; load average {search.load:.1f} at the end",
            ),
        ]
    rows.append(
        (
            "ratio two / one",
            f"{two.per_hour / one.per_hour:.2f}x",
            f"submit to commit {one.ended - one.submitted:.1f} s vs "
            f"{two.ended - two.submitted:.1f} s",
        )
    )
    return rows


def publish_rows(one: SearchRun, two: SearchRun) -> list[tuple[str, str, str]]:
    rows = []
    for search in (one, two):
        total = search.ended - search.last
        verify, push = search.stage_seconds("verify"), search.stage_seconds("push")
        rows.append(
            (
                search.label,
                f"{total:.1f} s",
                f"verify {verify:.1f} s, push {push:.1f} s, the rest {total - verify - push:.1f} s"
                f" (search step {search.stage_seconds('search'):.1f} s in all; the job's "
                f"updated_at {search.job['updated_at'] - search.last:.1f} s after the last trial)",
            )
        )
    return rows


def timing_row(label: str, timing: Timing, note: str = "") -> tuple[str, str, str]:
    return (
        label,
        f"{timing.rate:.1f}/s",
        f"median {1000 * timing.median:.0f} ms, p95 {1000 * timing.p95:.0f} ms{note}",
    )


def refresh_rows(
    idle: dict[str, Timing], loaded: dict[str, Timing], running: tuple[int, int]
) -> list[tuple[str, str, str]]:
    rows = []
    for name, timing in loaded.items():
        base = idle.get(name)
        if base is None:
            rows.append(timing_row(f"{name}, search running", timing))
            continue
        rows.append(timing_row(f"{name}, idle", base))
        ratio = f"; {timing.median / base.median:.2f}x the idle median"
        rows.append(timing_row(f"{name}, search running", timing, ratio))
    rows.append(("running search's trials", f"{running[0]}->{running[1]}", "while it was timed"))
    return rows


@dataclass(frozen=True)
class Results:
    one: SearchRun
    two: SearchRun
    idle: dict[str, Timing]
    loaded: dict[str, Timing]
    running: tuple[int, int]  # trials of the running search before and after its timing


def measure_all(hub_url: str, database: str, work: Path, mode: Mode) -> Results:
    """The two searches, then the refresh rate idle and under a third search; every
    process of the bot is stopped before the database is."""
    settings = {"MERGEBOT_DATABASE_URL": database, **LIMITS}
    spec = spec_text(mode, mode.trials)
    processes: list[MergebotProcess] = []
    try:
        serve, api = start_serve(hub_url, work / "api", "--no-worker", **settings)
        processes.append(serve)
        print("searches:", flush=True)
        workers = [start_worker(hub_url, work, "worker-1", settings)]
        processes += workers
        one = run_search(api, database, workers, "one worker", spec, mode)
        workers.append(start_worker(hub_url, work, "worker-2", settings))
        processes.append(workers[-1])
        two = run_search(api, database, workers, "two workers", spec, mode)

        print(f"refresh: {mode.calls} calls an endpoint, idle then loaded ...", flush=True)
        paths = {
            "GET /api/jobs": "/api/jobs",
            "GET /api/searches/{id}": f"/api/searches/{two.job['id']}",
        }
        idle = time_endpoints(api, paths, mode.calls)
        loaded, running = under_a_running_search(
            api,
            spec_text(mode, 100 * mode.trials, seed=1),
            lambda job_id: time_endpoints(
                api,
                {**paths, "GET /api/searches/{running id}": f"/api/searches/{job_id}"},
                mode.calls,
            ),
        )
    finally:
        for process in reversed(processes):
            process.stop()
    return Results(one, two, idle, loaded, running)


# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench-search-jobs"))
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the script")
    args = parser.parse_args()
    mode_name = "small" if args.small else "full"
    mode = MODES[mode_name]
    work = args.work / mode_name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    begun, load_before = time.perf_counter(), os.getloadavg()
    base, tuned = make_models(work / "models", mode)
    params = parameter_count(base)
    print(
        f"{mode_name}: 3 Llama models of {params / 1e6:.2f}M parameters; {mode.trials} trials, "
        f"nll on {mode.examples} texts of {mode.chars} chars; {os.cpu_count()} CPUs; "
        f"workers with OMP_NUM_THREADS=1; logs in {work}",
        flush=True,
    )
    sandbox = start_sandbox({"alice": (base, tuned)})
    try:
        with postgres_url() as database:
            results = measure_all(sandbox.url, database, work, mode)
    finally:
        sandbox.__exit__()
    total, load_after = time.perf_counter() - begun, os.getloadavg()

    print_table(
        f"1. trials per hour, the same search ({mode.trials} trials, {params / 1e6:.2f}M "
        f"parameters, {os.cpu_count()} CPUs; target: two / one close to 2x)",
        throughput_rows(results.one, results.two),
    )
    print_table(
        "2. last trial (its end in the study) to the job seen succeeded "
        "(GET /api/jobs/{id} every 50 ms)",
        publish_rows(results.one, results.two),
    )
    print_table(
        f"3. refresh rate, {mode.calls} back-to-back calls each, idle vs a search running on "
        f"both workers (the idle search status is the finished {mode.trials}-trial search's)",
        refresh_rows(results.idle, results.loaded, results.running),
    )
    print(
        f"\nbenchmark wall {total / 60:.1f} min; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}"
    )


if __name__ == "__main__":
    main()
