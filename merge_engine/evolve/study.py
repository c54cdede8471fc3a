"""The study: CMA-ES over the genes (:mod:`merge_engine.evolve.sampler`), its trials kept in
a database so that a search survives a kill and several processes can share it. No optimizer
state is stored: a completed trial holds its genes (one user attribute, not one Optuna
parameter each: Optuna writes and reads a parameter as a row of its own, with its
distribution, which costs seconds a trial at thousands of genes), its fitness and the
generation that proposed it.

The budget counts completed trials. Every process runs trials until the completed ones plus
the ones running elsewhere fill it; a trial asked for when it is already full is pruned
before it evaluates anything. A process that dies mid-trial stops sending heartbeats, and the
next process to ask for a trial fails it, so that its candidate's slot is run again.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from merge_engine.errors import MergeError
from merge_engine.evolve.genome import Gene
from merge_engine.evolve.report import TrialRecord
from merge_engine.evolve.sampler import GENES, CmaSampler, genes_of, genes_text
from merge_engine.evolve.stopping import SearchStopped

GENE_NAMES = "gene names"
"""Study user attribute: the genes' names, in the order every trial stores its values."""
HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
"""A running trial whose process has not been heard from for this long is failed."""
WAIT_SECONDS = 0.5
"""How often a process whose share of the budget is taken checks on the others' trials."""


def default_storage(folder: Path) -> str:
    """The SQLite file next to the output."""
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database at ``url``, with heartbeats so that a dead process's trial is failed."""
    sqlite = url.startswith("sqlite")
    for scheme in ("postgresql://", "postgres://"):  # the driver mergebot installs: psycopg 3
        if url.startswith(scheme):
            url = "postgresql+psycopg://" + url.removeprefix(scheme)
    kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    try:
        storage = _rdb_storage(url, kwargs)
        if sqlite:
            _write_ahead(storage.engine)
        return storage
    except Exception as error:  # noqa: BLE001  (SQLAlchemy and driver errors of every kind)
        raise MergeError(
            f"cannot open the study storage {without_password(url)} ({type(error).__name__}); "
            "check the URL (sqlite:///path/study.db or postgresql://user@host/db) and that the database is up"
        ) from None


def _rdb_storage(url: str, engine_kwargs: dict, attempts: int = 3) -> optuna.storages.RDBStorage:
    """Optuna's storage; processes starting at once race to create its tables, and the
    loser of that race finds them made when it tries again. The race shows as a duplicate row
    (IntegrityError), a lock (OperationalError), or on PostgreSQL as a table or type another
    process is creating at that moment (ProgrammingError: duplicate or not yet visible)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                )
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(WAIT_SECONDS)
    raise AssertionError("unreachable")


def _write_ahead(engine) -> None:
    """SQLite in write-ahead mode without a sync per commit: Optuna commits once per gene of
    every trial, and a sync each time costs more than evaluating a small model. A killed
    process loses nothing (the operating system holds its writes); a power cut can lose the
    last trials but never corrupts the study."""
    from sqlalchemy import event

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while Optuna made its tables reconnect with them


def without_password(url: str) -> str:
    """The URL as an error may quote it: any password, in the user part or the query, hidden."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001  (not even a URL: quote nothing of it)
        return "(the URL given)"
    query = {k: ("***" if "password" in k.lower() else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    seed: int,
    population: int | None,
    starts: list[dict[str, float]],
    genes: list[Gene],
) -> optuna.Study:
    """The study ``name`` in ``storage``. The process that creates it queues ``starts`` (the
    centre of the space, and for a layer path every source's own path) as its first trials;
    after that CMA-ES (:class:`CmaSampler`, seeded with ``seed``) proposes every candidate, so
    a serial search proposes the same ones every time."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is raised, not logged
    sampler = CmaSampler(genes, seed, population)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, direction="maximize"
        )
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    study.set_user_attr(GENE_NAMES, [g.name for g in genes])
    for values in starts:
        study.enqueue_trial(values)
    return study


@dataclass(frozen=True)
class Outcome:
    """What evaluating one candidate gave."""

    fitness: float
    scores: dict[str, float]
    merge_seconds: float


class NonFiniteFitness(MergeError):
    """A candidate's fitness is NaN or infinite: CMA-ES cannot rank it, and every later trial
    would be wasted, so the search fails at once."""

    def __init__(self, stage: str, number: int, outcome: Outcome):
        bad = [f"{task} scored {v}" for task, v in outcome.scores.items() if not math.isfinite(v)]
        if bad:
            why = (
                f"(task {', '.join(bad)}): the candidate's model gives outputs that are not finite numbers; "
                "narrow the searched bounds (parameters.search, layers.scale_bounds) and check that "
                "the sources give finite outputs on the task data"
            )
        elif outcome.scores:
            why = "although every task's score is finite: their weighted mean overflowed; use smaller task weights"
        else:
            why = "from the fitness function; make it return a finite number"
        super().__init__(
            f"trial {number} of the {stage} search has fitness {outcome.fitness} {why}"
        )


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def fail_running(storage: optuna.storages.BaseStorage, name: str) -> int:
    """Fail every running trial of study ``name``, if it exists (resuming a search that no
    process runs any more, before any other process starts)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(running)


def records_of(
    study: optuna.Study, stage: str, known: Container[int] = frozenset()
) -> list[TrialRecord]:
    """The completed trials of ``study`` but those numbered in ``known``, in the order they
    were asked for (reading a trial's genes is what costs: thousands of numbers each)."""
    names = study.user_attrs.get(GENE_NAMES, [])
    return [_record(t, stage, names) for t in completed(study) if t.number not in known]


def _record(trial: FrozenTrial, stage: str, names: list[str]) -> TrialRecord:
    return TrialRecord(
        number=trial.number,
        stage=stage,
        params=genes_of(trial, names),
        fitness=float(trial.value),
        scores=dict(trial.user_attrs.get("scores", {})),
        seconds=float(trial.user_attrs.get("seconds", 0.0)),
        merge_seconds=float(trial.user_attrs.get("merge_seconds", 0.0)),
        worker=str(trial.user_attrs.get("worker", "")),
    )


@dataclass(frozen=True)
class StoredStudy:
    """A study as any process reads it: its completed trials and its user attributes."""

    records: list[TrialRecord]
    attributes: dict


def read_study(storage: optuna.storages.BaseStorage, name: str, stage: str) -> StoredStudy:
    """Study ``name`` in one read of its trials; empty before it exists."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return StoredStudy([], {})
    return StoredStudy(records_of(study, stage), study.user_attrs)


@dataclass
class Stage:
    """One study run to its budget by this process, alongside any others."""

    study: optuna.Study
    name: str
    genes: list[Gene]
    budget: int
    worker: str = field(default_factory=worker_name)

    _names: list[str] = field(init=False, repr=False)
    _beaten: set[int] = field(default_factory=set, init=False, repr=False)
    """Running trials this process gave a heartbeat of its own (see :meth:`_fail_orphans`)."""

    def __post_init__(self) -> None:
        self._names = [g.name for g in self.genes]

    def counts(self) -> tuple[int, int]:
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)
        )
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        return done, len(trials) - done

    def run(
        self,
        evaluate: Callable[[dict[str, float]], Outcome],
        deadline: float | None = None,
        after_trial: Callable[[], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Run trials until the budget is complete (waiting for other processes' last trials),
        ``deadline`` (``time.monotonic()``) passes or ``stop()`` says so after a trial. A
        trial that ``evaluate`` abandons by raising :class:`SearchStopped` is failed in the
        study and ends the run; a trial whose fitness is not a finite number fails the search
        (:class:`NonFiniteFitness`)."""
        while True:
            self._fail_orphans()
            done, running = self.counts()
            left = None if deadline is None else deadline - time.monotonic()
            if done >= self.budget or (left is not None and left <= 0) or (stop and stop()):
                return
            if done + running >= self.budget:
                time.sleep(WAIT_SECONDS)  # other processes hold the last trials
                continue
            try:
                completed_here = self._run_trial(evaluate)
            except SearchStopped:
                return
            if completed_here and after_trial:
                after_trial()

    def _run_trial(self, evaluate: Callable[[dict[str, float]], Outcome]) -> bool:
        """Ask for one trial and evaluate it; whether it completed here (not pruned for a
        budget that other processes' trials took, nor failed by another process meanwhile)."""
        with warnings.catch_warnings():  # Optuna warns that heartbeats are for its optimize()
            warnings.simplefilter("ignore", UserWarning)
            trial = self.study.ask()
        storage = self.study._storage
        with _Heartbeat(storage, trial._trial_id):
            ahead = [
                t
                for t in self.study.get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)
                )
                if t.number < trial.number
            ]
            if len(ahead) >= self.budget:  # the budget is taken by other trials
                _tell(self.study, trial, state=TrialState.PRUNED)
                return False
            try:
                values = trial.relative_params
                start = time.perf_counter()
                outcome = evaluate(values)
                if not math.isfinite(outcome.fitness):
                    raise NonFiniteFitness(self.name, trial.number, outcome)
            except BaseException:
                _tell(self.study, trial, state=TrialState.FAIL)
                raise
            trial.set_user_attr(GENES, genes_text(values, self._names))
            trial.set_user_attr("scores", outcome.scores)
            trial.set_user_attr("merge_seconds", outcome.merge_seconds)
            trial.set_user_attr("seconds", time.perf_counter() - start)
            trial.set_user_attr("worker", self.worker)
            return _tell(self.study, trial, values=outcome.fitness)

    def _fail_orphans(self) -> None:
        """Fail the trials whose process died: Optuna fails a running trial once its heartbeats
        stop, but a process killed between creating a trial and its first heartbeat (while
        the sampler proposes the candidate) leaves one with none, which would hold its slot of
        the budget for ever. Each running trial therefore gets one heartbeat from here, once:
        a live one beats on by itself, an orphan goes stale and is failed a grace period
        later."""
        storage = self.study._storage
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id not in self._beaten:
                storage.record_heartbeat(trial._trial_id)
                self._beaten.add(trial._trial_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def records(self, known: Container[int] = frozenset()) -> list[TrialRecord]:
        return records_of(self.study, self.name, known)

    def fitnesses(self) -> list[float]:
        """The completed trials' fitness, without reading their genes."""
        return [float(t.value) for t in completed(self.study)]

    def best(self) -> TrialRecord:
        """The completed trial with the highest fitness (the lowest number among ties), the
        same whichever process asks."""
        records = self.records()
        if not records:
            raise MergeError(
                f"the {self.name} search finished no trial before it stopped (at budget.wall_time, or when asked to); "
                "start a new search with more wall_time"
            )
        return max(records, key=lambda r: (r.fitness, -r.number))


def _tell(study: optuna.Study, trial: optuna.Trial, **outcome) -> bool:
    """Finish ``trial``; False when another process failed it first (its heartbeat came late,
    on a stalled machine), so that its slot is run again."""
    try:
        study.tell(trial, **outcome)
    except ValueError as error:  # Optuna says so only in this message
        if not str(error).startswith("Cannot tell a FAIL trial"):
            raise
        return False
    return True


class _Heartbeat:
    """Tells the storage every few seconds, from a thread, that this process still runs a
    trial; the first at once."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.done.wait(HEARTBEAT_SECONDS):
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        self.thread.join()
