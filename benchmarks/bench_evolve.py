"""Trials per hour, merge share, memory and workers of ``mergebot evolve`` on a ~100M-parameter
Llama-style family (random weights: a base and two "fine-tunes", each the base plus a small
random task vector), scored on two tasks of 64 inline examples each (an ``nll`` task of random
lowercase text and an ``exact_match`` task with ``max_new_tokens: 4``), on this machine's CPU.

    python benchmarks/bench_evolve.py [--work /tmp/mergebot-bench-evolve] [--small]

What it measures, with its target:

1. trials per hour of each space: ``parameters`` (TIES, weight and density, one value per
   layer), ``layers`` (2 repeats, paths of at most 16 layers) and ``both``. Two figures: from
   the trials' own ``seconds`` (merge + evaluation), and from the stage's wall clock (first
   trial's start to last trial's end, read from the study database), which adds the sampler
   and the database; the fixed costs of a search (loading, the final table, writing the
   winner) are printed beside them.
2. the share of a ``parameters`` trial spent merging: ``merge_seconds / seconds``, target < 10 %.
3. a candidate merged in memory against writing the same model with ``mergebot merge``:
   ``merge(preflight(recipe), out)`` of the winner's recipe (page cache warm, timed in a fresh
   process) over the mean ``merge_seconds`` of a trial, target >= 10x.
4. memory across 50 ``parameters`` trials with a cheap fitness (an ``nll`` task of 8 short
   texts): the search runs through the Python API in its own process, which samples its RSS
   and private memory (RssAnon) after every trial from ``evolve(progress=...)``; target: flat,
   the growth from trial 1 to 50 well under one model's size.
5. ``--workers 2`` against ``--workers 1`` on the same ``parameters`` search (the CLI, trials
   per hour from the stage's wall clock). Every search runs as ``mergebot evolve`` in its own
   process; all of them share this machine's cores, so the load average and each process's
   CPU use (CPU seconds / wall seconds, at most the core count) are printed too.

``--threads N`` sets OMP_NUM_THREADS for every process of the benchmark (default: torch's, one
per core; ``--workers 2`` gives its second process cores // 2 threads itself). On a machine
that other work shares, one thread per process is the steadier figure: a torch thread that
waits for a descheduled sibling spins. ``--small`` runs the same on a tiny model in under a
minute (one thread unless told), to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


@dataclass(frozen=True)
class Mode:
    """The model family and the amount of search of one run of the benchmark."""

    model: dict
    trials: int  # per space (per stage with space: both)
    max_length: int  # longest layer path
    memory_trials: int
    examples: int = 64  # per task
    text_chars: int = 32  # nll texts
    word_chars: int = 3  # exact_match answers


MODES = {
    "full": Mode(
        model=dict(
            hidden_size=768,
            num_hidden_layers=12,
            intermediate_size=2560,
            vocab_size=96,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=256,
        ),
        trials=6,
        max_length=16,
        memory_trials=50,
    ),
    "small": Mode(
        model=dict(
            hidden_size=64,
            num_hidden_layers=4,
            intermediate_size=128,
            vocab_size=96,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        ),
        trials=6,
        max_length=6,
        memory_trials=50,
    ),
}


# The models and the spec


def make_models(folder: Path, mode: Mode) -> dict[str, Path]:
    """The base and two fine-tunes (base + random task vector of std 0.002), each with the
    tiny character tokenizer; reused when ``folder`` already holds this family."""
    from merge_engine.example import make_family, save_tiny_tokenizer

    marker = folder / "family.json"
    names = {"base": folder / "base", "a": folder / "finetune-1", "b": folder / "finetune-2"}
    if marker.is_file() and json.loads(marker.read_text()) == mode.model:
        return names
    shutil.rmtree(folder, ignore_errors=True)
    print(f"writing the model family into {folder} ...", flush=True)
    base, tuned = make_family(folder, "llama", finetunes=2, scale=0.002, **mode.model)
    for model in (base, *tuned):
        save_tiny_tokenizer(model)
    marker.write_text(json.dumps(mode.model))
    return names


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    count = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (a safetensors handle is not a dict)
                shape = handle.get_slice(name).get_shape()
                count += math.prod(shape)
    return count


def tasks(mode: Mode, seed: int = 0) -> list[dict]:
    """The two fitness tasks with their inline examples."""
    rng = random.Random(seed)
    texts = [
        {"text": "".join(rng.choice(LETTERS + " ") for _ in range(mode.text_chars))}
        for _ in range(mode.examples)
    ]
    words = [
        "".join(rng.choice(LETTERS) for _ in range(mode.word_chars)) for _ in range(mode.examples)
    ]
    rows = [{"prompt": f"copy {w}=", "answer": w} for w in words]
    return [
        {"name": "text", "kind": "nll", "data": {"examples": texts}},
        {"name": "copy", "kind": "exact_match", "max_new_tokens": 4, "data": {"examples": rows}},
    ]


def cheap_task(seed: int = 1) -> list[dict]:
    """One ``nll`` task of 8 short texts: a trial is then almost only its merge."""
    rng = random.Random(seed)
    texts = [{"text": "".join(rng.choice(LETTERS) for _ in range(12))} for _ in range(8)]
    return [{"name": "cheap", "kind": "nll", "data": {"examples": texts}}]


def write_spec(
    path: Path, space: str, models: dict[str, Path], fitness: list[dict], trials: int, mode: Mode
) -> Path:
    spec: dict = {
        "space": space,
        "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
    }
    if space in ("parameters", "both"):
        spec["base_model"] = str(models["base"])
        spec["parameters"] = {
            "method": "ties",
            "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
            "layers_per_value": 1,
        }
    if space in ("layers", "both"):
        spec["layers"] = {"repeats": 2, "max_length": mode.max_length}
    spec["fitness"] = fitness
    spec["budget"] = {"trials": trials}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


# Running a process and reading a finished search


@dataclass
class Run:
    wall: float  # seconds from start to exit
    cpu: float  # user + system CPU seconds (with the children it waited for)
    started: datetime  # local time, as Optuna stamps trials
    ended: datetime
    stdout: str


def run_process(command: list[str], log: Path, cwd: Path = REPO) -> Run:
    """Run ``command`` in ``cwd`` to its end; its CPU time comes from wait4, its output goes
    to ``log``."""
    started, start = datetime.now(), time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    wall, ended = time.perf_counter() - start, datetime.now()
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{text[-3000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, started, ended, text)


@dataclass
class StageFigures:
    name: str
    trials: int
    seconds: list[float]  # each trial's own seconds (merge + evaluation)
    merge_seconds: list[float]
    first_start: datetime
    last_end: datetime
    workers: dict[str, int]  # trials per process
    genes: int

    @property
    def wall(self) -> float:
        return (self.last_end - self.first_start).total_seconds()

    @property
    def mean(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    @property
    def mean_merge(self) -> float:
        return sum(self.merge_seconds) / len(self.merge_seconds)

    @property
    def merge_share(self) -> float:
        return sum(self.merge_seconds) / sum(self.seconds)

    @property
    def per_hour_trial(self) -> float:
        """Trials per hour if trials followed each other with no gap (one process)."""
        return 3600 / self.mean

    @property
    def per_hour_wall(self) -> float:
        return 3600 * self.trials / self.wall


def stage_figures(out: Path) -> dict[str, StageFigures]:
    """Each stage's completed trials, from the study database of the search in ``out``."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out / 'evolve' / 'study.db').resolve()}"
    figures = {}
    for name in optuna.study.get_all_study_names(storage):
        stage = name.rsplit("-", 1)[1]
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)
        )
        workers: dict[str, int] = {}
        for t in trials:
            workers[t.user_attrs["worker"]] = workers.get(t.user_attrs["worker"], 0) + 1
        figures[stage] = StageFigures(
            stage,
            len(trials),
            [t.user_attrs["seconds"] for t in trials],
            [t.user_attrs["merge_seconds"] for t in trials],
            min(t.datetime_start for t in trials),
            max(t.datetime_complete for t in trials),
            workers,
            len(trials[0].params),
        )
    return dict(sorted(figures.items(), key=lambda kv: kv[1].first_start))


@dataclass
class Search:
    label: str
    out: Path
    run: Run
    stages: dict[str, StageFigures]

    @property
    def setup(self) -> float:
        """Process start to the first trial: imports, checks, loading the sources."""
        return (min(s.first_start for s in self.stages.values()) - self.run.started).total_seconds()

    @property
    def finish(self) -> float:
        """Last trial to exit: the final table (winner held out, baselines) and the writing."""
        return (self.run.ended - max(s.last_end for s in self.stages.values())).total_seconds()


def run_search(label: str, spec: Path, out: Path, workers: int) -> Search:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "merge_engine.cli", "evolve", str(spec), str(out)]
    command += ["--workers", str(workers), "--device", "cpu", "--quiet"]
    print(f"  {label}: mergebot evolve --workers {workers} ...", flush=True)
    run = run_process(command, out.with_suffix(".log"))
    search = Search(label, out, run, stage_figures(out))
    print(
        f"    {run.wall:.1f} s, CPU {run.cpu / run.wall:.2f} cores; "
        + "; ".join(
            f"{s.name}: {s.trials} trials, {s.mean:.2f} s/trial, {s.wall:.1f} s stage wall"
            for s in search.stages.values()
        ),
        flush=True,
    )
    return search


# The children: a merge of the winner, a 50-trial search sampling its own memory


def child_merge(recipe: Path, out: Path) -> None:
    """Time ``merge(preflight(recipe), out)`` as ``mergebot merge`` runs it."""
    from merge_engine import load_recipe, merge, preflight

    start = time.perf_counter()
    plan = preflight(load_recipe(recipe))
    planned = time.perf_counter()
    merge(plan, out, device="cpu", show_progress=False)
    done = time.perf_counter()
    print(
        json.dumps({"preflight": planned - start, "merge": done - planned, "total": done - start})
    )


def _private() -> int:
    """RssAnon of this process in bytes: its own heap, without mapped files."""
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def child_memory(spec_path: Path, out: Path) -> None:
    """A search through the Python API; after every trial, this process's memory."""
    import psutil

    from merge_engine.evolve.search import evolve
    from merge_engine.evolve.spec import spec_from_text

    process = psutil.Process()
    samples = []

    def progress(stage: str, done: int, budget: int, best: float) -> None:
        samples.append({"trial": done, "rss": process.memory_info().rss, "private": _private()})

    spec = spec_from_text(spec_path.read_text(encoding="utf-8"))
    result = evolve(spec, out, device="cpu", show_progress=False, progress=progress)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    records = [{"seconds": r.seconds, "merge_seconds": r.merge_seconds} for r in result.records]
    print(json.dumps({"samples": samples, "peak_rss": peak * 1024, "records": records}))


def run_child(args: list[str], log: Path) -> tuple[dict, Run]:
    run = run_process([sys.executable, __file__, *args], log)
    return json.loads(run.stdout.strip().splitlines()[-1]), run


# The table


def rows_of_search(search: Search) -> list[tuple[str, str, str]]:
    rows = []
    for stage in search.stages.values():
        label = search.label if len(search.stages) == 1 else f"{search.label} / {stage.name}"
        rows.append(
            (
                f"{label}: trials/h (trial seconds)",
                f"{stage.per_hour_trial:,.0f}",
                f"{stage.trials} trials, {stage.mean:.2f} s each (merge {stage.mean_merge:.2f} s)",
            )
        )
        rows.append(
            (
                f"{label}: trials/h (stage wall)",
                f"{stage.per_hour_wall:,.0f}",
                f"{stage.wall / stage.trials:.2f} s/trial; sampler, study db and trials.jsonl {stage.wall / stage.trials - stage.mean:+.2f} s/trial ({stage.genes} genes)",
            )
        )
    rows.append(
        (
            f"{search.label}: fixed costs",
            f"{search.setup:.1f} + {search.finish:.1f} s",
            f"start to 1st trial + last trial to exit; whole run {search.run.wall:.1f} s, CPU {search.run.cpu / search.run.wall:.2f} cores",
        )
    )
    return rows


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for name, figure, note in rows:
        print(f"{name:<{width}}  {figure:>{value}}  {note}")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench-evolve"))
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the script")
    parser.add_argument("--trials", type=int, help="trials per space (default: 6)")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of every process (default: torch's)"
    )
    parser.add_argument("--child", choices=("merge", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "merge":
        return child_merge(args.input, args.out)
    if args.child == "memory":
        return child_memory(args.input, args.out)

    mode_name = "small" if args.small else "full"
    mode = MODES[mode_name]
    trials = args.trials or mode.trials
    threads = args.threads or (1 if args.small else None)
    if threads:
        ENV["OMP_NUM_THREADS"] = str(threads)
    work = args.work / mode_name
    work.mkdir(parents=True, exist_ok=True)
    begun, load_before = time.perf_counter(), os.getloadavg()
    models = make_models(work / "models", mode)
    params = parameter_count(models["base"])
    model_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    m = mode.model
    print(
        f"{mode_name}: Llama {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}: {params / 1e6:.1f}M "
        f"parameters ({mib(model_bytes)} float32) x 3 models; {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS {threads or 'unset'}",
        flush=True,
    )
    fitness = tasks(mode)
    specs = {
        space: write_spec(work / f"{space}.yaml", space, models, fitness, trials, mode)
        for space in ("parameters", "layers", "both")
    }
    memory_spec = write_spec(
        work / "memory.yaml", "parameters", models, cheap_task(), mode.memory_trials, mode
    )

    print("searches:", flush=True)
    one = run_search("parameters", specs["parameters"], work / "out-parameters", workers=1)
    two = run_search("parameters, 2 workers", specs["parameters"], work / "out-workers2", workers=2)
    layers = run_search("layers", specs["layers"], work / "out-layers", workers=1)
    both = run_search("both", specs["both"], work / "out-both", workers=1)

    print(f"  memory: {mode.memory_trials} parameters trials, cheap fitness ...", flush=True)
    shutil.rmtree(work / "out-memory", ignore_errors=True)
    memory, memory_run = run_child(
        ["--child", "memory", "--input", str(memory_spec), "--out", str(work / "out-memory")],
        work / "memory.log",
    )
    print("  mergebot merge of the parameters winner ...", flush=True)
    shutil.rmtree(work / "out-merge", ignore_errors=True)
    written, merge_run = run_child(
        [
            "--child",
            "merge",
            "--input",
            str(one.out / "mergebot_recipe.yaml"),
            "--out",
            str(work / "out-merge"),
        ],
        work / "merge.log",
    )
    shutil.rmtree(work / "out-merge", ignore_errors=True)
    total, load_after = time.perf_counter() - begun, os.getloadavg()

    # 1. trials per hour, per space
    rows = []
    for search in (one, layers, both):
        rows += rows_of_search(search)
    print_table(
        f"1. trials per hour ({mode_name}: {params / 1e6:.1f}M parameters, 2 x 64 examples)", rows
    )

    # 2. merge share of a parameters trial
    p = one.stages["parameters"]
    share = [m / s for m, s in zip(p.merge_seconds, p.seconds, strict=True)]
    print_table(
        "2. share of a parameters trial spent merging (target < 10 %)",
        [
            (
                "merge / trial (all trials)",
                f"{100 * p.merge_share:.1f} %",
                f"per trial {min(share):.0%} to {max(share):.0%}",
            ),
            (
                "merge per trial",
                f"{p.mean_merge:.2f} s",
                f"evaluation {p.mean - p.mean_merge:.2f} s",
            ),
        ],
    )

    # 3. in memory vs mergebot merge
    rec = memory["records"]
    memory_merge = sum(r["merge_seconds"] for r in rec) / len(rec)
    print_table(
        "3. in-memory candidate vs mergebot merge of the winner (target >= 10x)",
        [
            (
                "in-memory merge, parameters search",
                f"{p.mean_merge:.2f} s",
                f"mean of {p.trials} trials, into the preallocated model",
            ),
            (
                f"in-memory merge, {len(rec)}-trial run",
                f"{memory_merge:.2f} s",
                "mean of the memory run's trials (item 4)",
            ),
            (
                "merge(preflight(recipe), out)",
                f"{written['total']:.2f} s",
                f"preflight {written['preflight']:.2f} s, merge + write {written['merge']:.2f} s (page cache warm)",
            ),
            (
                "ratio",
                f"{written['total'] / p.mean_merge:.1f}x",
                f"{written['total'] / memory_merge:.1f}x against the {len(rec)}-trial run; "
                f"{merge_run.wall / p.mean_merge:.1f}x with the process start ({merge_run.wall:.1f} s, as the CLI)",
            ),
        ],
    )

    # 4. memory across trials
    samples = {s["trial"]: s for s in memory["samples"]}
    last = max(samples)
    marks = [t for t in (1, 10, 25, 50) if t in samples] or [1, last]
    mem_rows = [
        (f"after trial {t}", mib(samples[t]["rss"]), f"private {mib(samples[t]['private'])}")
        for t in marks
    ]
    grow, grow_private = (samples[last][k] - samples[1][k] for k in ("rss", "private"))
    warm = 10 if 10 in samples else 1
    mem_rows += [
        (
            f"growth trial 1 -> {last}",
            mib(grow),
            f"private {mib(grow_private)}; {grow / model_bytes:.1%} of one model ({mib(model_bytes)})",
        ),
        (
            f"growth trial {warm} -> {last}",
            mib(samples[last]["rss"] - samples[warm]["rss"]),
            f"private {mib(samples[last]['private'] - samples[warm]['private'])}",
        ),
        (
            "peak RSS of the process",
            mib(memory["peak_rss"]),
            f"{memory['peak_rss'] / model_bytes:.1f} models",
        ),
    ]
    mean_s = sum(r["seconds"] for r in rec) / len(rec)
    mem_rows.append(
        (
            "trial, cheap fitness",
            f"{mean_s:.2f} s",
            f"merge {memory_merge:.2f} s; whole run {memory_run.wall:.1f} s",
        )
    )
    print_table(f"4. memory across {last} parameters trials (target: flat)", mem_rows)

    # 5. workers
    q = two.stages["parameters"]
    print_table(
        f"5. --workers 2 vs 1, same parameters search ({os.cpu_count()} CPUs)",
        [
            (
                "--workers 1: trials/h (stage wall)",
                f"{p.per_hour_wall:,.0f}",
                f"{p.wall:.1f} s for {p.trials} trials, {p.mean:.2f} s/trial",
            ),
            (
                "--workers 2: trials/h (stage wall)",
                f"{q.per_hour_wall:,.0f}",
                f"{q.wall:.1f} s for {q.trials} trials, {q.mean:.2f} s/trial; per process {sorted(q.workers.values(), reverse=True)}",
            ),
            (
                "ratio 2 / 1",
                f"{q.per_hour_wall / p.per_hour_wall:.2f}x",
                f"whole runs {one.run.wall:.1f} s vs {two.run.wall:.1f} s ({one.run.wall / two.run.wall:.2f}x); CPU {one.run.cpu / one.run.wall:.2f} vs {two.run.cpu / two.run.wall:.2f} cores",
            ),
        ],
    )
    print(
        f"\nbenchmark wall {total / 60:.1f} min; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in load_after)}"
    )
    (work / "results.json").write_text(
        json.dumps(
            {
                "parameters": params,
                "searches": {
                    s.label: {
                        "wall": s.run.wall,
                        "cpu": s.run.cpu,
                        "setup": s.setup,
                        "finish": s.finish,
                        "stages": {
                            k: {
                                "trials": v.trials,
                                "seconds": v.seconds,
                                "merge_seconds": v.merge_seconds,
                                "stage_wall": v.wall,
                                "workers": v.workers,
                            }
                            for k, v in s.stages.items()
                        },
                    }
                    for s in (one, two, layers, both)
                },
                "merge": written,
                "memory": memory,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
