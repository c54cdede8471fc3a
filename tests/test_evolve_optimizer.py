"""The optimizer scales: at 5,000 genes a trial costs the optimizer and the study database
little and a fixed amount, the database holds the trials' genes and nothing that grows with
the optimizer, and a study's history is replayed from its trials, so that a resumed search
proposes what an uninterrupted one would have."""

from __future__ import annotations

import json
import time
from pathlib import Path

from merge_engine.evolve.genome import Gene, centre
from merge_engine.evolve.sampler import SEPARABLE_ABOVE
from merge_engine.evolve.study import Outcome, Stage, open_storage, open_study, records_of

SECONDS_PER_TRIAL = 2.5
"""Generous for a loaded 2-core machine: the whole trial with this fitness takes 0.05 s on a
quiet one and 0.8 s under the heaviest load seen; the benchmark measures the optimizer's part
at 0.04 s (Optuna's CmaEsSampler: 6 s a trial to store the genes alone, minutes to sample)."""
BYTES_PER_GENE_AND_TRIAL = 64
"""The documented bound (docs/evolve.md); a trial stores about 22 bytes per gene."""


def distance(target: float):
    """A cheap fitness: minus the squared distance of every gene from ``target``."""
    return lambda values: Outcome(-sum((v - target) ** 2 for v in values.values()), {}, 0.0)


def stage_of(path: Path, genes: list[Gene], budget: int, population: int | None = None) -> Stage:
    storage = open_storage(f"sqlite:///{path}")
    study = open_study(storage, "parameters", 7, population, [centre(genes)], genes)
    return Stage(study, "parameters", genes, budget)


def test_a_5000_gene_study_costs_a_bounded_time_and_space_per_trial(tmp_path, one_thread):
    genes = [Gene(f"weight.model_{i % 2}.layer_{i // 2}", 0.0, 1.0) for i in range(5000)]
    assert len(genes) > SEPARABLE_ABOVE  # a diagonal covariance
    trials = 50
    stage = stage_of(tmp_path / "study.db", genes, trials)

    start = time.perf_counter()
    stage.run(distance(0.3))
    seconds = time.perf_counter() - start

    records = stage.records()
    assert len(records) == trials and all(len(r.params) == 5000 for r in records)
    assert seconds / trials < SECONDS_PER_TRIAL, f"{seconds / trials:.2f} s a trial"
    size = sum(f.stat().st_size for f in tmp_path.glob("study.db*"))
    assert size < trials * len(genes) * BYTES_PER_GENE_AND_TRIAL, f"{size} bytes"


def test_a_resumed_study_proposes_what_an_uninterrupted_one_would(tmp_path, one_thread):
    """Population 4 over 300 genes (a diagonal covariance) and over 8 (a full one): six
    generations each, the second study stopped after 10 trials and opened again by a new
    sampler, which replays the generations from the database."""
    for count in (8, SEPARABLE_ABOVE + 44):
        genes = [Gene(f"g{i}", -1.0, 2.0) for i in range(count)]
        whole = stage_of(tmp_path / f"whole{count}.db", genes, 24, population=4)
        whole.run(distance(0.7))

        cut = tmp_path / f"cut{count}.db"
        stage_of(cut, genes, 10, population=4).run(distance(0.7))
        resumed = stage_of(cut, genes, 24, population=4)
        resumed.run(distance(0.7))

        expected = [r.params for r in whole.records()]
        assert [r.params for r in resumed.records()] == expected
        assert len({json.dumps(p) for p in expected}) == 24


def test_the_genes_are_stored_once_per_trial_not_as_optuna_parameters(tmp_path, one_thread):
    genes = [Gene(f"g{i}", 0.0, 1.0) for i in range(20)]
    stage = stage_of(tmp_path / "study.db", genes, 6)
    stage.run(distance(0.2))
    trials = stage.study.get_trials(deepcopy=False)
    assert all(t.params == {} for t in trials)
    assert [r.params for r in records_of(stage.study, "parameters")][0] == centre(genes)
