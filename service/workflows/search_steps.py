"""A search job's durable steps — pre-flight → search → verify → push — and the helpers that
let every listening worker evaluate trials of a running search.

The study lives in the bot's own database (Optuna's tables beside the jobs), named after the
job, so a worker killed in the middle loses at most the trial it was running: the search step
runs again (under the same worker id, or on another machine) and continues the same study.
Searches take turns in each worker's search lane: the search step gives its turn away between
trials when another search waits (:func:`search_step`; the workflow queues the next turn).
Any other worker whose search lane is empty joins a running search (:func:`help_searches`)
and evaluates trials until the budget is spent or the search stops or ends its turn; its
trials carry its worker id.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dbos import DBOS

from merge_engine.data.calibration import load_tokenizer
from merge_engine.errors import MergeError
from merge_engine.evolve.checks import check_spec
from merge_engine.evolve.fitness import evaluate, read_tasks
from merge_engine.evolve.report import TrialRecord, fitness_text
from merge_engine.evolve.search import BASELINES, SearchResult, StudyNames, evolve
from merge_engine.evolve.spec import SearchSpec, spec_from_text
from merge_engine.evolve.study import StoredStudy, read_study
from merge_engine.run.executor import resolve_device
from merge_engine.sources.inspection import model_class
from merge_engine.sources.model_building import building_model
from service.disk import search_bytes
from service.verification.verify import verify_output
from service.workflows import steps
from service.workflows.job_store import Job

log = logging.getLogger("mergebot.search")
HELP_POLL_SECONDS = 2.0
"""How often an idle worker looks for a running search to help."""
HELD_OUT_TOLERANCE = 1e-4
"""How far the published model's held-out fitness may be from the searched candidate's."""


def search_spec(job: Job) -> SearchSpec:
    """The pinned spec the job searches."""
    return spec_from_text(job.recipe)


def study_names(job: Job) -> StudyNames:
    """Every attempt of a job continues the same studies: trials are never run twice."""
    return StudyNames(job.id)


def read_studies(service, job: Job) -> list[StoredStudy]:
    """Each stage's study of ``job`` as stored now, in stage order."""
    names = study_names(job)
    stages = search_spec(job).stages()
    return [read_study(service.studies, names.of(stage), stage) for stage in stages]


def trial_records(service, job: Job) -> list[TrialRecord]:
    """The completed trials of ``job`` so far, every stage, as any process reads them."""
    return [record for study in read_studies(service, job) for record in study.records]


def search_seconds(job: Job, now: float) -> float:
    """The seconds ``job`` has held a search lane: its ended turns and the current one.
    ``wall_time`` bounds these, not the time the search waited for its turns."""
    current = now - job.turn_started if job.turn_started is not None else 0.0
    return (job.search_seconds or 0.0) + current


def search_status(service, job: Job) -> dict:
    """What a search's watcher sees: the sources' and the uniform merge's fitness (scored
    before the first trial), the trials so far (each with the best fitness up to it), the
    budget, the best candidate's genes and what is left of the wall-time budget."""
    spec = search_spec(job)
    studies = read_studies(service, job) if job.stage != "queued" else []
    records = [record for study in studies for record in study.records]
    trials, best = [], None
    for index, record in enumerate(records):
        if best is None or record.fitness > best.fitness:
            best = record
        trials.append(
            {
                "index": index,
                "stage": record.stage,
                "number": record.number,
                "fitness": record.fitness,
                "best": best.fitness,
                "worker": record.worker,
            }
        )
    left = None
    if spec.budget.wall_time and job.stage == "search" and job.status in ("queued", "running"):
        left = max(0.0, spec.budget.wall_time - search_seconds(job, time.time()))
    baselines = studies[0].attributes.get(BASELINES, []) if studies else []
    return finite_json(
        {
            "job": job.summary_json(),
            "baselines": [
                {"model": b["label"], "search": b["search"], "held_out": b["held_out"]}
                for b in baselines
            ],
            "budget": spec.total_trials(),
            "done": len(records),
            "best": None
            if best is None
            else {"fitness": best.fitness, "stage": best.stage, "params": best.params},
            "seconds_left": left,
            "outcome": job.outcome,
            "trials": trials,
        }
    )


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float made None: JSON has no NaN, and the API
    encodes with ``allow_nan=False``, so a non-finite number is null, never invalid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


# --- the steps -----------------------------------------------------------------------------


@DBOS.step(name="mergebot.search.preflight")
def search_preflight_step(job_id: str) -> None:
    """The pinned sources and the task data are still there and readable by this requester."""
    job = steps.job_of(job_id)
    service = steps.running_service()
    cache = service.settings.job_dir(job_id) / "hub"
    checked = steps.with_hub(
        job_id,
        lambda: check_spec(
            search_spec(job), token=steps.read_token(job), hub_only=True, cache_dir=cache
        ),
    )
    service.check_disk(search_bytes(checked.sources), "the worker's")  # the search downloads


@DBOS.step(name="mergebot.search.run")
def search_step(job_id: str) -> bool:
    """Run trials (with any helping workers) until the budget is spent, the wall time is up or
    the requester asks for the best so far, and write the winner with its card; or, once
    this turn has had its slice while another search waits, stop after the current trial
    and return True (the workflow queues the next turn)."""
    service = steps.running_service()
    store = service.store
    job = steps.job_of(job_id)
    store.count_merge_run(job_id, service.settings.worker_id)
    if job.turn_started is None:  # kept across a crash: the time until recovery counts
        job.turn_started = time.time()
        store.update(job_id, turn_started=job.turn_started)
    spec = search_spec(job)
    out = steps.output_dir(service, job)
    resume = (out / "evolve" / "spec.yaml").is_file()  # this machine ran it before
    slice_end = job.turn_started + service.settings.search_slice_seconds
    report = _progress(service, job, spec, steps.JobCancelled)
    trials = 0  # of this turn: every turn runs at least one

    def progress(stage: str, done: int, budget: int, best: float) -> None:
        nonlocal trials
        trials += 1
        report(stage, done, budget, best)

    def pause() -> bool:
        due = trials > 0 and time.time() >= slice_end
        return due and store.search_waits(other_than=job_id)

    try:
        result = evolve(
            spec,
            out,
            resume=resume,
            storage=service.settings.database_url,
            device=service.settings.device,
            token=steps.read_token(job),
            hub_only=True,
            cache_dir=service.settings.job_dir(job_id) / "hub",
            show_progress=False,
            progress=progress,
            study_name=study_names(job).prefix,
            worker=service.settings.worker_id,
            started=time.time() - search_seconds(job, time.time()),
            stop=lambda: _stop_asked(service, job_id, steps.JobCancelled),
            pause=pause,
            card_details={
                "job_id": job.id,
                "credit": steps.credit(job),
                "endpoint": service.settings.endpoint,
            },
        )
    finally:
        store.update(job_id, search_seconds=search_seconds(job, time.time()), turn_started=None)
    if result is None:
        return True
    card = (out / "README.md").read_text(encoding="utf-8")
    store.update(
        job_id,
        outcome=json.dumps(outcome_of(result)),
        card=card,
        log=f"winner: search fitness {fitness_text(result.search_fitness)}, "
        f"held-out {fitness_text(result.held_out_fitness)}",
    )
    # the stage's time is the wall time the card states, every turn's, not this turn's alone
    store.update(job_id, log=steps.stage_done("search", result.wall_seconds))
    return False


def outcome_of(result: SearchResult) -> dict:
    """What the job table keeps of a finished search: the fitness table, the winner first."""
    rows = [
        {"model": "winner", "search": result.search_fitness, "held_out": result.held_out_fitness}
    ]
    rows += [
        {"model": b.label, "search": b.search, "held_out": b.held_out} for b in result.baselines
    ]
    trials = len(result.records)
    return finite_json(
        {"rows": rows, "trials": trials, "logit_difference": result.logit_difference}
    )


def _stop_asked(service, job_id: str, cancelled: type[Exception]) -> bool:
    """Asked between trials and within one (every half second): whether the requester wants
    the best so far now; a cancel raises ``cancelled``, which abandons the running trial."""
    job = service.store.get(job_id)
    if job is not None and job.cancel_requested:
        raise cancelled()
    return job is None or job.finish_early


def _progress(
    service, job: Job, spec: SearchSpec, cancelled: type[Exception]
) -> Callable[[str, int, int, float], None]:
    """After each trial: the job's fraction, a log line when the best improves, and a cancel
    that stops the search here."""
    stages = spec.stages()
    best_so_far: dict[str, float] = {}
    written = 0.0

    def report(stage: str, done: int, budget: int, best: float) -> None:
        nonlocal written
        before = stages.index(stage) * budget
        values: dict = {"fraction": (before + done) / spec.total_trials()}
        if best_so_far.get(stage) != best:
            best_so_far[stage] = best
            values["log"] = f"{stage} trial {done}/{budget}: best fitness {fitness_text(best)}"
        if "log" in values or time.monotonic() - written >= steps.PROGRESS_EVERY or done == budget:
            written = time.monotonic()
            service.store.update(job.id, **values)
        if service.store.cancel_requested(job.id):
            raise cancelled()

    return report


@DBOS.step(name="mergebot.search.verify")
def search_verify_step(job_id: str) -> None:
    """The written winner loads, gives finite outputs and, measured again on the held-out
    split, has the fitness the card states."""
    service = steps.running_service()
    job = steps.job_of(job_id)
    device = resolve_device(service.settings.device)
    out = steps.merged_output(job)
    verify_output(out, device)
    stated = job.outcome["rows"][0]["held_out"]
    spec = search_spec(job)
    token = steps.read_token(job)
    cache = service.settings.job_dir(job_id) / "hub"
    measured = held_out_fitness(out, spec, device, token, cache)
    if abs(measured - stated) > HELD_OUT_TOLERANCE:
        raise MergeError(
            f"the written model's held-out fitness is {measured:.6g}, not the {stated:.6g} its search measured; submit the search again, and report it if it repeats"
        )


def held_out_fitness(
    folder: Path, spec: SearchSpec, device: torch.device, token: str | bool, cache: Path
) -> float:
    """The fitness of the model in ``folder`` on the spec's held-out split."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with building_model():
        model = model_class(config.to_dict()).from_pretrained(
            folder, dtype="auto", trust_remote_code=False
        )
    model.to(device).eval()
    tasks = read_tasks(spec.fitness, token, True, cache)
    tokenizer = load_tokenizer([folder], spec.sources()[0])
    return evaluate(model, tokenizer, tasks, "held_out", device).total


# --- helping other workers' searches -------------------------------------------------------


def help_searches(service, stopping: threading.Event) -> None:
    """While this worker runs no job, evaluate trials of a search another worker runs; return
    when ``stopping`` is set. Started beside every worker's queue."""
    me = service.settings.worker_id
    helped: set[tuple[str, float | None]] = set()  # turns spent, stopped or failing here
    while not stopping.wait(HELP_POLL_SECONDS):
        if service.store.searching(me):
            continue
        for job in service.store.running_searches():
            turn = (job.workflow_id, job.turn_started)
            if job.worker == me or turn in helped:
                continue
            try:
                join_search(service, job, stopping)
            except Exception as error:  # noqa: BLE001  (the search's own worker carries on)
                log.warning("helping search %s stopped: %s", job.id, error)
            if not service.store.searching(me):  # not called away to a search of its own
                helped.add(turn)
            break


def join_search(service, job: Job, stopping: threading.Event) -> None:
    """Evaluate trials of ``job`` until its budget is spent, it stops searching or gives its
    turn away, or this worker's search lane is given a search of its own (then at once,
    abandoning its running trial)."""
    me = service.settings.worker_id
    folder = service.settings.work_dir / "helping" / job.id
    spec = search_spec(job)
    (folder / "evolve").mkdir(parents=True, exist_ok=True)
    (folder / "evolve" / "spec.yaml").write_text(spec.to_yaml(), encoding="utf-8")

    def stop() -> bool:
        current = service.store.get(job.id)
        return (
            stopping.is_set()
            or current is None
            or current.status != "running"
            or current.stage != "search"
            or current.finish_early
            or current.cancel_requested
            or current.turn_started != job.turn_started
            or service.store.searching(me)
        )

    log.info("worker %s helps search %s", me, job.id)
    try:
        evolve(
            spec,
            folder,
            join=True,
            storage=service.settings.database_url,
            device=service.settings.device,
            token=service.vault.get(job.id) or False,
            hub_only=True,
            cache_dir=folder / "hub",
            show_progress=False,
            study_name=study_names(job).prefix,
            worker=me,
            started=time.time() - search_seconds(job, time.time()),
            stop=stop,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_helping(service) -> threading.Event:
    """Help running searches from a thread of this process; set the event to stop."""
    stopping = threading.Event()
    threading.Thread(
        target=help_searches, args=(service, stopping), name="search-helper", daemon=True
    ).start()
    return stopping
