"""CMA-ES over a stage's genes whose state is never stored: every process recomputes it from
the study's completed trials.

Optuna's own ``CmaEsSampler`` pickles its optimizer into the database with every trial (45 MB
at 1,368 genes) and samples with a full covariance matrix, whose eigendecomposition is cubic in
the gene count. This sampler keeps instead, per trial, the number of the generation whose state
proposed it (a trial system attribute), and per generation the trial numbers it was told (a
study system attribute). The state after generation ``g`` is a function of the state before it
and of those trials' values and parameters, so any process replays it, in memory, generation by
generation; a process that keeps running only tells each new generation once.

- Up to :data:`SEPARABLE_ABOVE` genes the covariance is full (``cmaes.CMA``); above, it is
  diagonal (sep-CMA-ES, Ros & Hansen 2008, ``cmaes.SepCMA``): sampling and an update are
  linear in the gene count, and its larger learning rate for the diagonal learns more of a
  long genome in a budget of hundreds of trials than a full matrix could.
- Trial ``n`` draws its candidate with a random generator seeded by (seed, n), so a serial
  search proposes the same candidates every time, and processes sharing a study never draw the
  same one, whether or not a trial is complete yet.
- A queued trial (``study.enqueue_trial``, such as the centre of the space) keeps its values and
  is told with its generation like any other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import cmaes
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from merge_engine.evolve.genome import Gene

SEPARABLE_ABOVE = 256
"""The most genes searched with a full covariance matrix; longer genomes get a diagonal one.
A full matrix costs a cubic eigendecomposition per generation and quadratic work per trial:
about 0.01 s a generation at 256 genes, but seconds at 1,000 and minutes at 5,000."""
GENERATION = "mergebot:cma:generation"
"""Trial system attribute: the generation whose state proposed the trial."""
TOLD = "mergebot:cma:told:"
"""Study system attribute, suffixed with a generation's number: the trial numbers it was told."""
GENES = "genes"
"""Trial user attribute: the trial's genes, as one JSON text (see :func:`genes_text`)."""
STEP = 1 / 6
"""The initial step size, in each gene's bounds scaled to [0, 1] (Optuna's default)."""


class CmaSampler(BaseSampler):
    """CMA-ES replayed from the completed trials (see the module). It proposes the whole genome
    at once (relative sampling); ``population`` None: CMA-ES's default, 4 + 3 ln(genes)."""

    def __init__(self, genes: Sequence[Gene], seed: int, population: int | None):
        self._genes = list(genes)
        self._names = [g.name for g in self._genes]
        self._space = {g.name: FloatDistribution(g.low, g.high) for g in self._genes}
        self._low = np.array([g.low for g in self._genes])
        width = np.array([g.high - g.low for g in self._genes])
        self._width = np.where(width > 0, width, 1.0)
        self._seed = seed
        self._population = population
        self._optimizer: cmaes.CMA | cmaes.SepCMA | None = None
        self._generation = 0

    @property
    def separable(self) -> bool:
        return len(self._genes) > SEPARABLE_ABOVE

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, float]:
        optimizer = self._caught_up(study)
        study._storage.set_trial_system_attr(trial._trial_id, GENERATION, self._generation)
        optimizer.reseed_rng(_trial_seed(self._seed, trial.number))
        x = optimizer.ask()[: len(self._genes)]
        values = self._low + x * self._width
        proposed = {g.name: float(v) for g, v in zip(self._genes, values, strict=True)}
        return {**proposed, **trial.system_attrs.get("fixed_params", {})}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> float:
        raise ValueError(f"{param_name} is not a gene of this search; only genes are sampled")

    def _caught_up(self, study: optuna.Study) -> cmaes.CMA | cmaes.SepCMA:
        """The optimizer with every generation told whose trials are complete."""
        if self._optimizer is None:
            self._optimizer, self._generation = self._new_optimizer(), 0
        size = self._optimizer.population_size
        while True:
            complete = {
                t.number: t
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.system_attrs.get(GENERATION) == self._generation
            }
            if len(complete) < size:
                return self._optimizer
            told = self._told(study, sorted(complete)[:size])
            if not set(told) <= complete.keys():  # another process saw a trial we do not yet
                continue
            self._optimizer.tell([(self._scaled(complete[n]), -complete[n].value) for n in told])
            self._generation += 1

    def _told(self, study: optuna.Study, first: list[int]) -> list[int]:
        """The trials generation ``self._generation`` is told: the first process to complete it
        records its choice (the lowest numbers it saw complete), and every process then tells
        that one, so that processes and later resumes replay the same history."""
        storage, key = study._storage, f"{TOLD}{self._generation}"
        if key not in storage.get_study_system_attrs(study._study_id):
            storage.set_study_system_attr(study._study_id, key, first)
        return list(storage.get_study_system_attrs(study._study_id)[key])

    def _scaled(self, trial: FrozenTrial) -> np.ndarray:
        genes = genes_of(trial, self._names)
        values = np.array([genes[name] for name in self._names])
        scaled = (values - self._low) / self._width
        return np.pad(scaled, (0, self._dimensions() - len(scaled)), constant_values=0.5)

    def _dimensions(self) -> int:
        """cmaes searches two dimensions at least: a single gene gets an ignored companion."""
        return max(2, len(self._genes))

    def _new_optimizer(self) -> cmaes.CMA | cmaes.SepCMA:
        n = self._dimensions()
        mean, bounds = np.full(n, 0.5), np.tile([0.0, 1.0], (n, 1))
        if self.separable:
            # Every resample costs a draw of the whole genome, and at this size a draw seldom
            # falls inside every bound: after 10 tries the candidate is clipped.
            return cmaes.SepCMA(
                mean,
                STEP,
                bounds,
                seed=self._seed,
                n_max_resampling=10,
                population_size=self._population,
            )
        return cmaes.CMA(
            mean,
            STEP,
            bounds,
            seed=self._seed,
            n_max_resampling=10 * n,
            population_size=self._population,
        )


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def genes_text(genes: dict[str, float], names: Sequence[str]) -> str:
    """A trial's genes as they are stored: their values in the order of ``names`` (kept once
    per study), as one JSON text, which Optuna copies as one string when it copies a trial."""
    return json.dumps([genes[name] for name in names])


def genes_of(trial: FrozenTrial, names: Sequence[str]) -> dict[str, float]:
    """A completed trial's genes (Optuna's parameters in a study made before mergebot kept
    them in one attribute)."""
    text = trial.user_attrs.get(GENES)
    if text is None:
        return dict(trial.params)
    return dict(zip(names, json.loads(text), strict=True))
