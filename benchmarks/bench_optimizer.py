"""The optimizer's own cost per trial and the study database's size, at 1,000 and 5,000 genes,
mergebot's sampler (CMA-ES replayed from the trials, diagonal above 256 genes) against Optuna's
``CmaEsSampler`` as the search used it before (one ``suggest_float`` per gene), in one run.

    python benchmarks/bench_optimizer.py [--genes 1000 5000] [--trials 200]
                                         [--old-trials 40] [--old-seconds 600] [--work DIR]

Both run a cheap fitness (minus the squared distance of every gene from 0.3) through a SQLite
study, one thread. A trial's overhead is the wall time of the run less the fitness's own time,
per trial: the sampler, the database, the budget bookkeeping. Printed per gene count: the mean
over all trials and over the last full generation, the slowest trial, and the database's size
after the trials (checkpointed, write-ahead log included) with bytes per trial and gene.
Optuna's sampler runs at most ``--old-trials`` trials or ``--old-seconds``: at 5,000 genes one
of its trials takes minutes, so its figures there are for the trials it finished; its
bytes per trial and gene are compared with ours.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from merge_engine.evolve.genome import Gene, centre  # noqa: E402
from merge_engine.evolve.sampler import SEPARABLE_ABOVE  # noqa: E402
from merge_engine.evolve.study import Outcome, Stage, open_storage, open_study  # noqa: E402


@dataclass
class Run:
    label: str
    genes: int
    trials: int
    overheads: list[float]
    """Per trial: from the end of the previous trial's fitness to the end of this one's, less
    this one's fitness time."""
    population: int
    database_bytes: int

    def report(self) -> str:
        mean = sum(self.overheads) / len(self.overheads)
        last = self.overheads[-self.population :] if len(self.overheads) >= self.population else []
        last_mean = f"{sum(last) / len(last):.3f} s" if last else "(no full generation)"
        per_gene = self.database_bytes / (self.trials * self.genes)
        return (
            f"{self.label:>10} {self.genes:>5} genes, {self.trials:>3} trials: overhead a trial "
            f"{mean:.3f} s (last generation of {self.population}: {last_mean}, slowest "
            f"{max(self.overheads):.2f} s); database {self.database_bytes / 1e6:.1f} MB, "
            f"{per_gene:.1f} bytes a trial and gene"
        )


def fitness_timer():
    """The fitness, and the overheads it records: the time between fitness calls, less their
    own time."""
    overheads: list[float] = []
    last = [time.perf_counter()]

    def fitness(values: dict[str, float]) -> float:
        start = time.perf_counter()
        value = -math.fsum((v - 0.3) ** 2 for v in values.values())
        end = time.perf_counter()
        overheads.append(start - last[0])
        last[0] = end
        return value

    return fitness, overheads


def default_population(genes: int) -> int:
    """CMA-ES's population when the spec gives none (both samplers)."""
    return 4 + math.floor(3 * math.log(genes))


def database_bytes(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def ours(work: Path, count: int, trials: int) -> Run:
    genes = [Gene(f"weight.model_{i % 2}.layer_{i // 2}", 0.0, 1.0) for i in range(count)]
    path = work / f"ours-{count}.db"
    study = open_study(
        open_storage(f"sqlite:///{path}"), "parameters", 0, None, [centre(genes)], genes
    )
    fitness, overheads = fitness_timer()
    Stage(study, "parameters", genes, trials).run(lambda v: Outcome(fitness(v), {}, 0.0))
    return Run(
        "mergebot", count, trials, overheads, default_population(count), database_bytes(path)
    )


def optuna_cmaes(work: Path, count: int, trials: int, seconds: float) -> Run:
    """The search as it was: Optuna's CmaEsSampler, one suggest_float per gene."""
    genes = [Gene(f"weight.model_{i % 2}.layer_{i // 2}", 0.0, 1.0) for i in range(count)]
    path = work / f"optuna-{count}.db"
    sampler = optuna.samplers.CmaEsSampler(seed=0, warn_independent_sampling=False)
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{path}"),
        study_name="parameters",
        sampler=sampler,
        direction="maximize",
    )
    study.enqueue_trial(centre(genes))
    fitness, overheads = fitness_timer()

    def objective(trial: optuna.Trial) -> float:
        return fitness({g.name: trial.suggest_float(g.name, g.low, g.high) for g in genes})

    study.optimize(objective, n_trials=trials, timeout=seconds, gc_after_trial=False)
    done = len(overheads)
    return Run("optuna", count, done, overheads, default_population(count), database_bytes(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--old-trials", type=int, default=40)
    parser.add_argument("--old-seconds", type=float, default=600)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    work = args.work or Path(tempfile.mkdtemp(prefix="mergebot-bench-optimizer-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"diagonal covariance above {SEPARABLE_ABOVE} genes; work folder {work}")
    try:
        for count in args.genes:
            new = ours(work, count, args.trials)
            print(new.report(), flush=True)
            old = optuna_cmaes(work, count, args.old_trials, args.old_seconds)
            print(old.report(), flush=True)
            ratio = (sum(old.overheads) / len(old.overheads)) / (
                sum(new.overheads) / len(new.overheads)
            )
            per_gene_new = new.database_bytes / (new.trials * new.genes)
            per_gene_old = old.database_bytes / (old.trials * old.genes)
            print(
                f"{'':>10} {count:>5} genes: Optuna's overhead a trial is {ratio:.0f}x ours, "
                f"its bytes a trial and gene {per_gene_old / per_gene_new:.0f}x ours",
                flush=True,
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
