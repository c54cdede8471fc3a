"""The whole search: check the spec, load the sources once, run each stage's study to its
budget (with any other processes sharing it), then score the winner, every source and the
uniform merge on both splits and write the winner with ``mergebot merge``'s own writer.

    OUT/                  the winning model, its card and mergebot_recipe.yaml
    OUT/evolve/           spec.yaml, study.db (unless --storage), trials.jsonl, fitness.png,
                          path.png (layer paths), parameters-merge/ (space: both)
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from merge_engine.data.calibration import load_tokenizer
from merge_engine.errors import MergeError, OutputExistsError
from merge_engine.evolve import report
from merge_engine.evolve.candidates import (
    LayerCandidate,
    LoadedSource,
    ParameterCandidate,
    folded_recipe,
    load_source,
    output_dtype,
    timed,
)
from merge_engine.evolve.checks import CheckedSpec, check_spec
from merge_engine.evolve.fitness import evaluate
from merge_engine.evolve.genome import Gene, LayerGenes, ParameterGenes, centre, path_slots
from merge_engine.evolve.spec import ParameterGenome, SearchSpec
from merge_engine.evolve.stopping import StopCheck, never_stop
from merge_engine.evolve.study import (
    Outcome,
    Stage,
    default_storage,
    fail_running,
    open_storage,
    open_study,
    worker_name,
)
from merge_engine.methods import get_method
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.run.executor import resolve_device, write_merge
from merge_engine.sources.inspection import ModelSource, model_class
from merge_engine.sources.model_building import building_model
from merge_engine.sources.tensors import TensorInfo

FitnessFunction = Callable[[nn.Module, str], float]
"""A fitness of your own: called with a candidate model and the split ("search" while
searching, "held_out" for the final table); higher is better."""
Progress = Callable[[str, int, int, float], None]
"""Called after each trial with (stage, trials done, budget, best fitness so far)."""
SPEC_NAME = "spec.yaml"
BASELINES = "baselines"
"""The study attribute that holds the baselines' fitness (a list of Baseline fields)."""
PROBE_SHAPE = (2, 16)


@dataclass
class SearchResult:
    out: Path
    recipe: Recipe
    """The winning recipe as written (a layer path: passthrough slices, scales folded)."""
    search_fitness: float
    held_out_fitness: float
    baselines: list[report.Baseline]
    records: list[report.TrialRecord]
    path: list[report.PathSlot] | None
    logit_difference: float
    """Largest |logit| difference between the written model and the evaluated candidate."""
    wall_seconds: float
    """The search's wall time as ``budget.wall_time`` counts it, up to the writing of the
    winner's card, which states it (:meth:`_Search.elapsed`)."""


class _Scorer:
    """A model's fitness on a split: the spec's tasks, or the caller's own function."""

    def __init__(
        self, checked: CheckedSpec, tokenizer, device: torch.device, own: FitnessFunction | None
    ):
        self.checked, self.tokenizer, self.device, self.own = checked, tokenizer, device, own

    def __call__(
        self, model: nn.Module, split: str, check: Callable[[], None] = never_stop
    ) -> tuple[float, dict[str, float]]:
        if self.own is not None:
            with torch.no_grad():
                return float(self.own(model, split)), {}
        result = evaluate(model, self.tokenizer, self.checked.tasks, split, self.device, check)
        return result.total, {s.task: s.value for s in result.scores}


def _prepare_folder(spec: SearchSpec, folder: Path, out: Path, resume: bool, joining: bool) -> None:
    """A new search gets an empty output folder; a resumed one (or a joining worker) the
    spec it started with."""
    saved = folder / SPEC_NAME
    if resume or joining:
        if not saved.is_file():
            raise MergeError(
                f"{out} holds no search to continue; run mergebot evolve without --resume to start one"
            )
        if saved.read_text(encoding="utf-8") != spec.to_yaml():
            raise MergeError(
                f"the spec differs from the one the search in {out} started with ({saved}); resume with that spec or choose a new output folder"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(
            f"output folder {out} already exists and is not empty; choose a new folder, or continue its search with --resume"
        )
    folder.mkdir(parents=True)
    saved.write_text(spec.to_yaml(), encoding="utf-8")


def _worker_device(device: str, index: int) -> str:
    """Worker ``index``'s device: its own GPU when there are several."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


STORAGE_VARIABLE = "MERGEBOT_EVOLVE_STORAGE"
"""How a worker process gets the study's URL: not on its command line, where ``ps`` shows a
password to everyone on the machine."""


def threads_per_process(processes: int, device: torch.device) -> int:
    """The torch threads of each of a search's ``processes`` on this machine: one when the
    candidates run on a GPU (the CPU only launches its kernels), else an equal share of the
    cores this process may use, never more than torch has now (so ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads`` set lower is kept: on a machine other work shares, one thread
    per process is the steady choice, since a thread whose sibling was descheduled spins).
    Parent and workers together then never ask for more threads than there are cores."""
    if device.type == "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(torch.get_num_threads(), (cores or 1) // processes))


def _start_workers(
    spec_path: Path, out: Path, storage: str, count: int, device: str, threads: int
) -> list[subprocess.Popen]:
    """``count`` more processes evaluating trials of the same studies, ``threads`` torch
    threads each; their errors go to this process's standard error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), STORAGE_VARIABLE: storage}
    command = [sys.executable, "-m", "merge_engine.cli", "evolve", str(spec_path), str(out)]
    return [
        subprocess.Popen(
            [*command, "--join", "--device", _worker_device(device, index), "--quiet"], env=env
        )
        for index in range(1, count + 1)
    ]


def evolve(
    spec: SearchSpec,
    out: str | Path,
    *,
    resume: bool = False,
    storage: str | None = None,
    workers: int = 1,
    device: str = "auto",
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    fitness: FitnessFunction | None = None,
    progress: Progress | None = None,
    join: bool = False,
    study_name: str | None = None,
    worker: str | None = None,
    started: float | None = None,
    stop: Callable[[], bool] | None = None,
    pause: Callable[[], bool] | None = None,
    card_details: dict[str, Any] | None = None,
) -> SearchResult | None:
    """Run the search of ``spec`` and write its winner into ``out``. ``join``: only evaluate
    trials of a search that another process started (returns None). A search that fails
    before its first trial leaves no output folder behind.

    For a service that runs searches as jobs: ``study_name`` names the studies (default: from
    the spec's fingerprint), ``worker`` is recorded with each trial (default: host and process
    id), ``wall_time`` counts from ``started`` (POSIX seconds; default: now), ``stop()`` is
    asked after each trial and every half second within one whether to end the search and
    write the best so far (a running trial is abandoned; ``stop()`` may also raise, which
    abandons the trial and ends the search with that exception), ``pause()`` after each trial
    whether to leave the search for now (evolve returns None; the study keeps every trial, and
    a later call continues it), and ``card_details`` are further arguments of the card (see
    :func:`merge_engine.output.card.build_card`)."""
    out = Path(out)
    folder = out / "evolve"
    if workers < 1:
        raise MergeError(f"--workers {workers} is not a number of processes; use 1 or more")
    if fitness is not None and workers > 1:
        raise MergeError(
            "a fitness function of your own cannot reach worker processes; run with workers=1, or describe the fitness as tasks in the spec"
        )
    storage = storage or (os.environ.get(STORAGE_VARIABLE) if join else None)
    checked = check_spec(
        spec, token=token, hub_only=hub_only, cache_dir=cache_dir, own_fitness=fitness is not None
    )
    torch_device = resolve_device(device)
    store = open_storage(storage) if storage else None
    starting = not (resume or join)
    _prepare_folder(spec, folder, out, resume, join)
    children: list[subprocess.Popen] = []
    threads, own_threads = threads_per_process(workers, torch_device), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = store or open_storage(default_storage(folder))
        names = StudyNames(study_name or f"evolve-{spec.fingerprint()}")
        if resume and storage is None:  # the local study's last process is gone
            for name in spec.stages():
                fail_running(store, names.of(name))
        # The other processes start first: they import torch and load the models meanwhile.
        if not join:
            url = storage or default_storage(folder)
            children = _start_workers(folder / SPEC_NAME, out, url, workers - 1, device, threads)
        search = _Search(
            checked,
            out,
            store,
            torch_device,
            _Loading(token, hub_only, cache_dir),
            fitness,
            _Reporting(show_progress, progress, stop, pause, card_details),
            _Sharing(names, worker or worker_name(), started, join),
        )
        search.run()
        for child in children:
            child.wait()  # a worker that died was replaced by the others: its error is above
        return None if join or search.paused else search.finish()
    except BaseException:
        for child in children:
            child.terminate()
        if starting and not (folder / "trials.jsonl").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing of a search that never started
        raise
    finally:
        torch.set_num_threads(own_threads)
        for child in children:
            child.wait()


@dataclass(frozen=True)
class StudyNames:
    """The names of a search's studies, one per stage: ``<prefix>-parameters`` and so on."""

    prefix: str

    def of(self, stage: str) -> str:
        return f"{self.prefix}-{stage}"


@dataclass(frozen=True)
class _Loading:
    """How the sources are read."""

    token: str | bool | None
    hub_only: bool
    cache_dir: Path | None


@dataclass(frozen=True)
class _Reporting:
    """What this process shows and is asked while it searches."""

    show_progress: bool
    progress: Progress | None
    stop: Callable[[], bool] | None
    pause: Callable[[], bool] | None
    card_details: dict[str, Any] | None


@dataclass(frozen=True)
class _Sharing:
    """What every process of one search agrees on."""

    names: StudyNames
    worker: str
    started: float | None
    join: bool


class _Search:
    """This process's part of a search: the sources loaded once, each stage's study run to its
    budget alongside any other processes."""

    def __init__(
        self,
        checked: CheckedSpec,
        out: Path,
        store,
        device: torch.device,
        loading: _Loading,
        fitness: FitnessFunction | None,
        reporting: _Reporting,
        sharing: _Sharing,
    ):
        spec = checked.spec
        self.loading, self.reporting, self.sharing = loading, reporting, sharing
        self.spec, self.checked, self.out, self.folder = spec, checked, out, out / "evolve"
        self.store, self.device = store, device
        self.loaded = {
            ref: load_source(ref, device, loading.token, loading.hub_only, loading.cache_dir)
            for ref in spec.referenced_models()
        }
        first = spec.sources()[0]
        tokenizer = (
            load_tokenizer([self.loaded[first].source.folder], first) if checked.tasks else None
        )
        self.score = _Scorer(checked, tokenizer, device, fitness)
        self.stages: list[Stage] = []
        wall = spec.budget.wall_time
        waited = time.time() - sharing.started if sharing.started else 0.0
        self.started = time.monotonic() - waited
        """When the wall time started, on the monotonic clock: ``started`` less the time
        since (a bot's search: the turns it held a search lane before this one)."""
        self.deadline = self.started + wall if wall else None
        self.halt = StopCheck(reporting.stop)
        """Asked within each trial's work: a stop request or a spent wall time abandons it."""
        self.paused = False
        self.baselines: list[report.Baseline] = []
        self.parameter_genes: ParameterGenes | None = None
        self.parameter_candidate: ParameterCandidate | None = None
        self.path_genes: LayerGenes | None = None
        self.layer_candidate: LayerCandidate | None = None
        self.layer_sources: list[LoadedSource] = []
        self.written: dict[str, set[int]] = {}
        """By stage, the numbers of the trials this process has put in trials.jsonl."""

    def elapsed(self) -> float:
        """The search's wall time so far: what ``budget.wall_time`` bounds, and the duration
        its card, its job log and the CLI state."""
        return time.monotonic() - self.started

    def run(self) -> None:
        spec, checked, sources = self.spec, self.checked, self.spec.sources()
        if spec.space in ("parameters", "both"):
            genes = ParameterGenes(
                spec.parameters,
                checked.method,
                sources,
                spec.base_model,
                checked.layers_per_model[0],
                spec.seed,
            )
            self.parameter_genes = genes
            self.parameter_candidate = self._parameter_candidate()
            self._run_stage(
                "parameters",
                genes.genes,
                [centre(genes.genes)],
                lambda v: self.parameter_candidate.build(genes.recipe(v), self.halt),
            )
        if spec.space in ("layers", "both") and not (self.halt.stopped or self.paused):
            self.layer_sources = [self.loaded[ref] for ref in sources]
            if self.parameter_genes is not None:  # the first stage's winner joins the sources
                self.layer_sources.insert(0, self._stage_one_merge())
            counts = [s.module.config.num_hidden_layers for s in self.layer_sources]
            genes = self.path_genes = LayerGenes(spec.layers, counts)
            self.layer_candidate = LayerCandidate(self.layer_sources)
            self._run_stage(
                "layers",
                genes.genes,
                genes.starts(),
                lambda v: self.layer_candidate.build(genes.path(v)),
            )

    def _parameter_candidate(self) -> ParameterCandidate:
        start = self.parameter_genes.recipe(centre(self.parameter_genes.genes))
        dtype = output_dtype(start, self.loaded)
        return ParameterCandidate(self.loaded, start.donor(), dtype, self.device)

    def _stage_one_merge(self) -> LoadedSource:
        """The parameter stage's winner in memory, under the folder it is written to."""
        recipe = self.parameter_genes.recipe(self.stages[0].best().params)
        merged = self.parameter_candidate.build(recipe)  # no parameter trial follows
        ref = ModelReference(str((self.folder / "parameters-merge").resolve()))
        config = dict(self.loaded[self.spec.sources()[0]].source.config)
        state = merged.state_dict()
        infos = {name: TensorInfo(tuple(t.shape), t.dtype, "memory") for name, t in state.items()}
        return LoadedSource(ModelSource(ref, config, infos, memory=state), merged)

    def _run_stage(
        self,
        name: str,
        genes: list[Gene],
        starts: list[dict[str, float]],
        build: Callable[[dict[str, float]], nn.Module],
    ) -> None:
        spec = self.spec
        sharing = self.sharing
        study = open_study(
            self.store,
            sharing.names.of(name),
            spec.seed,
            spec.budget.population,
            starts,
            genes,
        )
        stage = Stage(study, name, genes, spec.budget.trials, sharing.worker)
        deadline = self.deadline
        if deadline is not None and spec.space == "both" and name == "parameters":
            deadline = self.started + spec.budget.wall_time / 2  # the layer path gets the rest
        self.halt.deadline = deadline
        if not self.stages and not sharing.join:
            self.baselines = self._stored_baselines(study)
        self.stages.append(stage)
        bar = tqdm(
            total=stage.budget,
            initial=stage.counts()[0],
            desc=f"{name} search",
            unit="trial",
            disable=not self.reporting.show_progress,
        )

        def evaluate_trial(values: dict[str, float]) -> Outcome:
            model, merge_seconds = timed(build, values)
            total, scores = self.score(model, "search", self.halt)
            return Outcome(total, scores, merge_seconds)

        def after_trial() -> None:
            first = not self.written
            new = [r for s in self.stages for r in s.records(self.written.get(s.name, set()))]
            if first:  # whatever an earlier (killed) process left is replaced
                report.write_trials(self.folder / "trials.jsonl", new)
            else:  # the file holds what this process wrote: add the new lines
                report.append_trials(self.folder / "trials.jsonl", new)
            for record in new:
                self.written.setdefault(record.stage, set()).add(record.number)
            done = stage.fitnesses()
            best = max(done)
            bar.n = len(done)
            postfix = {"best": report.fitness_text(best)}
            if deadline is not None:  # the bar's own estimate knows nothing of wall_time
                left = max(0.0, deadline - time.monotonic())
                postfix["wall-time budget left"] = report.duration(left)
            bar.set_postfix(postfix, refresh=True)
            if self.reporting.progress:
                self.reporting.progress(name, len(done), stage.budget, best)

        def between_trials() -> bool:
            """Whether to end the stage after this trial: stopped, or paused for now."""
            if self.halt.requested():
                return True
            self.paused = self.paused or bool(self.reporting.pause and self.reporting.pause())
            return self.paused

        try:
            stage.run(evaluate_trial, deadline, after_trial, between_trials)
        finally:
            bar.close()

    def _score_baselines(self) -> list[report.Baseline]:
        """Every source, and (with two or more) their uniform merge, built in the parameter
        search's model when there is one (before any trial uses it)."""
        baselines = []
        for ref in self.spec.sources():
            module = self.loaded[ref].module
            baselines.append(self._baseline(f"source {ref.short()}", module))
        if len(self.spec.sources()) < 2:
            return baselines
        recipe = self._uniform_genes().uniform_recipe()
        try:
            candidate = self.parameter_candidate or ParameterCandidate(
                self.loaded, recipe.donor(), output_dtype(recipe, self.loaded), self.device
            )
        except MergeError:  # a layer path's sources need not be mergeable (other depths)
            return baselines
        uniform = candidate.build(recipe)
        return [*baselines, self._baseline(f"uniform {recipe.merge_method} merge", uniform)]

    def _uniform_genes(self) -> ParameterGenes:
        genome = self.spec.parameters or ParameterGenome(
            method="ties" if self.spec.base_model else "linear"
        )
        method = self.checked.method or get_method(genome.method)
        layers = self.checked.layers_per_model[0]
        return ParameterGenes(
            genome, method, self.spec.sources(), self.spec.base_model, layers, self.spec.seed
        )

    def _baseline(self, label: str, model: nn.Module) -> report.Baseline:
        search, _ = self.score(model, "search", self.halt)
        held_out, scores = self.score(model, "held_out", self.halt)
        if not (math.isfinite(search) and math.isfinite(held_out)):
            raise MergeError(
                f"the {label} has fitness {search} on the search data and {held_out} on the held-out data: "
                "it gives outputs that are not finite numbers on the tasks; check that model and the task data"
            )
        return report.Baseline(label, search, held_out, scores)

    def _stored_baselines(self, study) -> list[report.Baseline]:
        """The baselines, scored once per search by the process that starts it and kept with
        the study (a resumed search, and whoever reads the study, finds them there)."""
        stored = study.user_attrs.get(BASELINES)
        if stored is None:
            stored = [asdict(b) for b in self._score_baselines()]
            study.set_user_attr(BASELINES, stored)
        return [report.Baseline(**b) for b in stored]

    def finish(self) -> SearchResult:
        finished = _Finished(self)
        if self.path_genes is None:
            return finished.write_parameters(self.parameter_genes, self.parameter_candidate)
        return finished.write_layers(
            self.path_genes, self.layer_candidate, self.layer_sources, self.parameter_genes
        )


class _Finished:
    """A search whose budget is spent: the winner scored and written beside the baselines."""

    def __init__(self, search: _Search):
        self.spec, self.out, self.folder, self.checked = (
            search.spec,
            search.out,
            search.folder,
            search.checked,
        )
        self.loaded, self.stages, self.score = search.loaded, search.stages, search.score
        self.baselines = search.baselines
        self.device, self.loading = search.device, search.loading
        self.card_details = search.reporting.card_details or {}
        self.elapsed = search.elapsed

    def write_parameters(
        self, genes: ParameterGenes, candidate: ParameterCandidate
    ) -> SearchResult:
        best = self.stages[-1].best()
        recipe = genes.recipe(best.params)
        winner = candidate.build(recipe)
        return self._write(winner, best.fitness, recipe, [], None)

    def write_layers(
        self,
        genes: LayerGenes,
        candidate: LayerCandidate,
        layer_sources: list[LoadedSource],
        parameter_genes: ParameterGenes | None,
    ) -> SearchResult:
        best = self.stages[-1].best()
        steps = genes.path(best.params)
        refs = [s.ref for s in layer_sources]
        winner = candidate.build(steps)
        stage_recipes = []
        if parameter_genes is not None:  # the first stage's merge is a source of the path
            stage_one = parameter_genes.recipe(self.stages[0].best().params)
            self._merge(stage_one, Path(str(refs[0])), None)
            stage_recipes.append(("stage 1: parameters", stage_one.to_yaml()))
        labels = [str(ref) for ref in refs]
        path = path_slots(steps, labels)
        counts = [s.module.config.num_hidden_layers for s in layer_sources]
        report.plot_path(path, labels, counts, self.folder / "path.png")
        return self._write(winner, best.fitness, folded_recipe(steps, refs), stage_recipes, path)

    def _merge(self, recipe: Recipe, out: Path, section: str | None) -> Path:
        from merge_engine import preflight

        loading = self.loading
        plan = preflight(
            recipe, token=loading.token, hub_only=loading.hub_only, cache_dir=loading.cache_dir
        )
        shutil.rmtree(out, ignore_errors=True)  # ours, from an earlier try of the same search
        return write_merge(
            plan,
            out,
            device=str(self.device),
            token=loading.token,
            show_progress=False,
            card_command="mergebot merge mergebot_recipe.yaml ./merged",
            cache_dir=loading.cache_dir,
            card_section=section,
            card_details=self.card_details,
        )

    def _write(
        self,
        winner: nn.Module,
        search_fitness: float,
        recipe: Recipe,
        stage_recipes: list[tuple[str, str]],
        path: list[report.PathSlot] | None,
    ) -> SearchResult:
        held_out, scores = self.score(winner, "held_out")
        probe = _probe(winner)
        with torch.no_grad():
            expected = winner(input_ids=probe).logits.float().cpu()
        baselines = self.baselines
        records = [r for s in self.stages for r in s.records()]
        report.write_trials(self.folder / "trials.jsonl", records)
        report.plot_fitness(records, baselines, self.folder / "fitness.png")
        wall_seconds = self.elapsed()
        section = report.search_section(
            spec_yaml=self.spec.to_yaml(),
            space=self.spec.space,
            trials_done={s.name: len(s.records()) for s in self.stages},
            budget=self.spec.budget.trials,
            wall_seconds=wall_seconds,
            winner_search=search_fitness,
            winner_held_out=held_out,
            winner_scores=scores,
            baselines=baselines,
            task_metrics={t.name: t.task.kind for t in self.checked.tasks},
            plot="evolve/fitness.png",
            path_picture="evolve/path.png" if path else None,
            path=path,
            stage_recipes=[
                *stage_recipes,
                (f"stage {len(stage_recipes) + 1}: the winner", recipe.to_yaml()),
            ],
            command="mergebot evolve evolve/spec.yaml ./search",
        )
        staging = self.folder / self.out.resolve().name  # the card is named after its folder
        self._merge(recipe, staging, section)
        for item in staging.iterdir():
            os.replace(item, self.out / item.name)
        staging.rmdir()
        written = _load_written(self.out)
        with torch.no_grad():
            actual = written(input_ids=probe.cpu()).logits.float()
        return SearchResult(
            self.out,
            recipe,
            search_fitness,
            held_out,
            baselines,
            records,
            path,
            float((actual - expected).abs().max()),
            wall_seconds,
        )


def _probe(model: nn.Module) -> torch.Tensor:
    """Token ids to compare the written model with the evaluated one."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, PROBE_SHAPE, generator=generator).to(device)


def _load_written(folder: Path) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    loader = model_class(config.to_dict())
    with building_model():
        return loader.from_pretrained(folder, dtype="auto", trust_remote_code=False).eval()
