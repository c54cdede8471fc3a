"""mergebot evolve against mergekit-evolve at the same trial budget, on the same task: held-out
scores side by side, trials per hour, and each optimizer's settings.

    # once: the benchmark venv for mergekit (never mergebot's environment)
    python benchmarks/bench_vs_mergekit_evolve.py --setup [--venv /work/venvs/mergekit]
    # the comparison: about 13 min per mergekit-evolve seed, 1-2 min per mergebot seed here
    OMP_NUM_THREADS=1 python benchmarks/bench_vs_mergekit_evolve.py \\
        [--work /tmp/mergebot-vs-mergekit] [--trials 60] [--seeds 0 1 2] [--mergekit-seeds 0] \\
        [--variants shipped start-d1 clip mergekit-like separable old-outside] \\
        [--filters self_attn mlp] [--lm-eval-check]

mergekit is installed only in the benchmark venv (``--setup`` runs ``python -m venv VENV``,
``VENV/bin/pip install torch==2.13.0`` (the CPU build) and ``VENV/bin/pip install
"mergekit[evolve]==0.1.5"``); it is not, and must not become, a dependency of mergebot.
This script runs in mergebot's environment and starts mergekit-evolve in the venv as a
subprocess, through ``benchmarks/mergekit_evolve_cpu.py``, which patches it (from its own
process, not its files) to run without a GPU: see that file for the five patches.

The task: the digit family of ``tests/evolve_tasks.py`` (a tiny Llama, hidden 64, 4 layers,
pretrained on copying and reversing digit strings; one fine-tune that copies and one that
reverses, each forgetting the other task), trained here in about 20 s. Both tools search a
TIES merge of the two fine-tunes over the base with one weight and one density per model
per layer (4 layer groups x 2 models x 2 parameters = 16 genes; mergekit-evolve
``layer_granularity: 1``, mergebot ``layers_per_value: 1``; ``normalize: false`` in both;
``--filters self_attn mlp`` gives each of those its own values in both: 48 genes),
with the fitness of ONE lm-evaluation-harness task YAML (``generate_until``, exact match
after stripping, ``max_gen_toks: 8``) over local jsonl: the search split is ``--examples``
dev strings per task, the held-out split ``--held-out`` test strings per task (strings the
family never trained on and the search never saw). mergekit-evolve gets a copy of the YAML
whose only split is the search split (it scores a task's test split when it has one);
mergebot gets the same YAML with the held-out file as its test split, which it holds out.

What it measures, per tool and seed:
- the winner's search fitness and held-out score, both re-scored here by one evaluator
  (mergebot's lm-eval fitness over the same YAML, float32) on the model each tool wrote, so
  the two columns are comparable (mergekit-evolve merges and evaluates in bfloat16, as
  shipped; its own best search score is printed too);
- trials (evaluations) and trials per hour of the search loop: mergekit-evolve from its first
  generation's start to the end of the optimization; mergebot from the start of its first
  trial to the end of its last (both exclude start-up, the final save and mergebot's
  baselines);
- the optimizer settings of each. mergekit-evolve: ``cma.fmin2`` (pycma), full covariance,
  x0 = weight 1/models and density 1, sigma0 1/6, population 4 + 3 ln(genes), no bounds (a
  negative weight is read as its absolute value, a density clamped to [0, 1]), and an extra
  evaluation of the final mean. mergebot: its replayed CMA-ES (``merge_engine/evolve/
  sampler.py``): full covariance up to 256 genes (``cmaes.CMA``), separable above, mean at the
  centre of the bounds (queued as trial 0), step 1/6 of each bound's width, the same
  population, bounds handled by resampling (then clipping).

The trial budget: mergekit-evolve (pycma) stops on ``--max-fevals`` only after the generation
that passes it and then evaluates the final mean, so its evaluations are counted from its log
and mergebot gets that count (``--trials`` is what mergekit-evolve is asked for: 60 at
population 12 gave 6 generations + 1 = 73). Without mergekit seeds (``--mergekit-seeds`` with
no value) mergebot gets ``--trials``.

``--variants`` adds ablations of mergebot's optimizer towards mergekit-evolve's settings,
patched into mergebot's child process only (no engine file changes): ``start-d1`` (CMA-ES's
mean and trial 0 at mergekit's x0, densities 1), ``clip`` (a draw outside the bounds is
clipped onto them, as mergekit's clamp puts mass on density 1, instead of redrawn) and
``mergekit-like`` (both); ``separable`` is mergebot's setting for genomes above 256 genes
(a diagonal covariance) at this genome's size, to price it; ``old-outside`` is mergebot
before it gave the final norm and head the last layer group's values (all tensors outside
the layers took the first group's). ``--lm-eval-check`` scores each winner's held-out split
once more with lm-eval's own ``hf`` model in the venv, an evaluator that is not mergebot's.
Every process runs with OMP_NUM_THREADS=1 (mergekit's Ray workers too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests/evolve_tasks.py: the digit family

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"  # the CPU build, as in mergebot's environment
RUNNER = REPO / "benchmarks" / "mergekit_evolve_cpu.py"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

TASK_YAML = """\
task: digits
dataset_path: json
dataset_kwargs:
  data_files: {data_files}
{splits}
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""
"""The one task both tools score; only its data files and splits differ between the copies."""


def setup_venv(venv: Path) -> None:
    """The benchmark venv: torch's CPU build first, then mergekit with its evolve extra."""
    commands = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", f"torch=={TORCH_VERSION}"],
        [str(venv / "bin" / "pip"), "install", f"mergekit[evolve]=={MERGEKIT_VERSION}"],
    ]
    for command in commands:
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


# The task


@dataclass
class Task:
    models: dict[str, Path]  # base, copy, reverse
    mergebot_yaml: Path  # validation: search rows, test: held-out rows
    mergekit_dir: Path  # holds the YAML whose only split is the search rows
    held_out_dir: Path  # the same YAML over the held-out rows only, for lm-eval's own check


def make_task(work: Path, examples: int, held_out: int) -> Task:
    from evolve_tasks import TASKS, digit_rows, make_digit_family, write_jsonl

    models = work / "models"
    if not (models / "reverse" / "model.safetensors").is_file():
        print("training the digit family (about 20 s) ...", flush=True)
        make_digit_family(models, seed=0)
    family = {name: models / name for name in ("base", "copy", "reverse")}
    data = work / "task"
    data.mkdir(parents=True, exist_ok=True)
    search = write_jsonl(
        data / "search.jsonl", [r for t in TASKS for r in digit_rows(t, examples, 0, "dev")]
    )
    held = write_jsonl(
        data / "held_out.jsonl", [r for t in TASKS for r in digit_rows(t, held_out, 0, "test")]
    )
    mergebot_yaml = data / "mergebot.yaml"
    mergebot_yaml.write_text(
        TASK_YAML.format(
            data_files=json.dumps({"validation": search.name, "test": held.name}),
            splits="validation_split: validation\ntest_split: test",
        )
    )
    mergekit_dir = work / "mergekit-tasks"
    mergekit_dir.mkdir(exist_ok=True)
    (mergekit_dir / "digits.yaml").write_text(  # lm-eval reads relative paths from the cwd
        TASK_YAML.format(
            data_files=json.dumps({"validation": str(search)}),
            splits="validation_split: validation",
        )
    )
    held_out_dir = work / "held-out-task"
    held_out_dir.mkdir(exist_ok=True)
    (held_out_dir / "digits.yaml").write_text(
        TASK_YAML.format(
            data_files=json.dumps({"validation": str(held)}),
            splits="validation_split: validation",
        )
    )
    return Task(family, mergebot_yaml, mergekit_dir, held_out_dir)


# The two tools


@dataclass
class Run:
    tool: str
    seed: int
    trials: int
    loop_seconds: float  # the search loop (see the module)
    process_seconds: float
    model: Path  # the winner as the tool wrote it
    own_search: float  # the winner's search fitness as the tool measured it
    settings: str
    search: float = float("nan")  # re-scored here
    held_out: float = float("nan")
    lm_eval_held_out: float = float("nan")  # lm-eval's own HF model, in the venv (--lm-eval-check)

    @property
    def per_hour(self) -> float:
        return self.trials / self.loop_seconds * 3600


def run_mergekit(
    task: Task, work: Path, venv: Path, seed: int, trials: int, filters: list[str]
) -> Run:
    out = work / f"mergekit-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    m = task.models
    config = out / "evolve.yaml"
    config.write_text(
        f"""genome:
  models: [{m["copy"]}, {m["reverse"]}]
  merge_method: ties
  base_model: {m["base"]}
  layer_granularity: 1
  normalize: false
  filters: {json.dumps(filters or None)}
tasks:
  - {{name: digits, metric: "exact_match,none"}}
apply_chat_template: false
fewshot_as_multiturn: false
"""
    )
    command = [
        str(venv / "bin" / "python"),
        str(RUNNER),
        str(config),
        "--storage-path",
        str(out / "storage"),
        "--max-fevals",
        str(trials),
        "--random-seed",
        str(seed),
        "--task-search-path",
        str(task.mergekit_dir),
    ]
    print(f"mergekit-evolve seed {seed}: {trials} evaluations asked ...", flush=True)
    started = time.monotonic()
    first = complete = None
    evaluations, best = 0, float("nan")
    popsize = 0
    with (
        (out / "log.txt").open("w") as log,
        subprocess.Popen(
            command,
            cwd=out,  # pycma writes its log folder, outcmaes/, into the working directory
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process,
    ):
        for line in process.stdout:
            log.write(line)
            if line.startswith("Received "):
                count = int(line.split()[1])
                popsize = max(popsize, count)
                evaluations += count
                first = first or time.monotonic()
            elif line.startswith("!!! OPTIMIZATION COMPLETE"):
                complete = time.monotonic()
            elif line.startswith("Best cost:"):
                best = -float(line.split(":")[1])
    if process.returncode != 0 or first is None or complete is None:
        raise SystemExit(f"mergekit-evolve failed (exit {process.returncode}); see {log.name}")
    settings = (
        f"pycma fmin2, full cov, x0 w=1/2 d=1, sigma0 1/6, pop {popsize}, unbounded (|w|, clamp d)"
    )
    return Run(
        "mergekit-evolve 0.1.5",
        seed,
        evaluations,
        complete - first,
        time.monotonic() - started,
        out / "storage" / "final_model",
        best,
        settings,
    )


def mergebot_spec(task: Task, seed: int, trials: int, filters: list[str]) -> str:
    m = task.models
    return f"""space: parameters
models: [{{model: {m["copy"]}}}, {{model: {m["reverse"]}}}]
base_model: {m["base"]}
parameters:
  method: ties
  search: {{weight: [0, 1], density: [0.1, 1]}}
  fixed: {{normalize: false}}
  layers_per_value: 1
  filters: {json.dumps(filters)}
  dtype: float32
fitness:
  - {{name: digits, kind: lm_eval, task: {task.mergebot_yaml}, metric: exact_match}}
budget: {{trials: {trials}}}
seed: {seed}
"""


def run_mergebot(
    task: Task, work: Path, seed: int, trials: int, variant: str, filters: list[str]
) -> Run:
    out = work / (f"mergebot-seed{seed}" + ("" if variant == "shipped" else f"-{variant}"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = out / "spec.yaml"
    spec.write_text(mergebot_spec(task, seed, trials, filters))
    result = out / "result.json"
    print(f"mergebot ({variant}) seed {seed}: {trials} trials ...", flush=True)
    started = time.monotonic()
    with (out / "log.txt").open("w") as log:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-mergebot",
                str(spec),
                str(out / "model"),
                str(result),
                "--variant",
                variant,
            ],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    figures = json.loads(result.read_text())
    return Run(
        "mergebot" if variant == "shipped" else f"mergebot [{variant}]",
        seed,
        figures["trials"],
        figures["loop_seconds"],
        time.monotonic() - started,
        out / "model",
        figures["search"],
        figures["settings"],
    )


VARIANTS = {
    "shipped": "mergebot as it is",
    "start-d1": "CMA-ES mean and trial 0 at mergekit's x0: weights 0.5, densities 1 (their upper bound)",
    "clip": "a draw outside the bounds is clipped to them (mass on the bound, as mergekit's clamp) instead of redrawn",
    "mergekit-like": "start-d1 and clip together",
    "separable": (
        "the diagonal covariance (sep-CMA-ES) that mergebot uses above 256 genes, here at 16: "
        "what the setting for long genomes costs"
    ),
    "old-outside": (
        "as before commit 8b32ae3: the embeddings, final norm and head all take the first layer "
        "group's values (mergekit: the head and final norm take the last group's)"
    ),
}
"""The ablations of mergebot's optimizer (``--variants``), patched into the child process only:
they change no file of the engine. They ask what of mergekit-evolve's settings matters."""


def patch_variant(variant: str) -> None:
    """Make the child's search ``variant`` (see :data:`VARIANTS`)."""
    import cmaes
    import numpy as np

    from merge_engine.evolve import sampler, search

    start_d1 = variant in ("start-d1", "mergekit-like")
    clip = variant in ("clip", "mergekit-like")
    if start_d1:

        def start(genes):
            return {
                g.name: g.high if g.name.startswith("density") else (g.low + g.high) / 2
                for g in genes
            }

        search.centre = start

    def new_optimizer(self):
        n = self._dimensions()
        mean = np.full(n, 0.5)
        if start_d1:
            mean[: len(self._names)] = [
                1.0 if name.startswith("density") else 0.5 for name in self._names
            ]
        bounds = np.tile([0.0, 1.0], (n, 1))
        kind = cmaes.SepCMA if self.separable else cmaes.CMA
        redraws = 0 if clip else (10 if self.separable else 10 * n)  # 0: clipped at once
        return kind(
            mean,
            sampler.STEP,
            bounds,
            seed=self._seed,
            n_max_resampling=redraws,
            population_size=self._population,
        )

    if variant == "separable":
        sampler.SEPARABLE_ABOVE = 0
    elif variant == "old-outside":
        from merge_engine import plan

        plan._outside_position = lambda name: 0.0
    elif variant != "shipped":
        sampler.CmaSampler._new_optimizer = new_optimizer


def child_mergebot(spec_path: Path, out: Path, result: Path, variant: str = "shipped") -> None:
    """In its own process: the search through the Python API, timing its trials."""
    patch_variant(variant)
    from merge_engine.evolve import sampler
    from merge_engine.evolve.search import evolve
    from merge_engine.evolve.spec import load_spec

    done: list[float] = []
    found = evolve(
        load_spec(spec_path),
        out,
        device="cpu",
        show_progress=False,
        progress=lambda stage, n, budget, best: done.append(time.monotonic()),
    )
    records = found.records
    genes = len(records[0].params)
    population = 4 + int(3 * math.log(genes))
    covariance = "separable" if genes > sampler.SEPARABLE_ABOVE else "full cov"
    loop = done[-1] - done[0] + records[0].seconds  # trial 0 began before the first report
    result.write_text(
        json.dumps(
            {
                "trials": len(records),
                "loop_seconds": loop,
                "search": found.search_fitness,
                "held_out": found.held_out_fitness,
                "baselines": [[b.label, b.search, b.held_out] for b in found.baselines],
                "settings": (
                    f"replayed CMA-ES, {covariance}, mean = centre (w 0.5, d 0.55), "
                    f"step {sampler.STEP:.3f} of width, pop {population}, bounded w [0,1] d [0.1,1]"
                    + ("" if variant == "shipped" else f"; {variant}: {VARIANTS[variant]}")
                ),
            }
        )
    )


# Scoring both winners with one evaluator


def score(task: Task, model_dir: Path) -> tuple[float, float]:
    """(search, held-out) exact match of a written model through mergebot's lm-eval fitness
    over the task YAML, in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_engine.evolve.fitness import evaluate_task, read_task
    from merge_engine.evolve.spec import FitnessTask

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(task.models["copy"])
    rows = read_task(
        FitnessTask.model_validate(
            {"kind": "lm_eval", "task": str(task.mergebot_yaml), "metric": "exact_match"}
        ),
        "fitness[0]",
    )
    cpu = torch.device("cpu")
    with torch.no_grad():
        return tuple(
            evaluate_task(model, tokenizer, rows, split, cpu).value
            for split in ("search", "held_out")
        )


def lm_eval_held_out(task: Task, venv: Path, model_dir: Path) -> float:
    """The held-out exact match as lm-eval's own ``hf`` model scores it (float32, CPU, batch
    1), in the mergekit venv: a check on :func:`score` by an evaluator that is not mergebot's."""
    output = task.held_out_dir / f"{model_dir.parent.name}-{model_dir.name}"
    subprocess.run(
        [
            str(venv / "bin" / "lm_eval"),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32",
            "--device",
            "cpu",
            "--tasks",
            "digits",
            "--include_path",
            str(task.held_out_dir),
            "--batch_size",
            "1",
            "--output_path",
            str(output),
        ],
        env=ENV,
        check=True,
        capture_output=True,
    )
    (found,) = output.rglob("results_*.json")
    return json.loads(found.read_text())["results"]["digits"]["exact_match,none"]


def print_table(runs: list[Run]) -> None:
    print()
    print(
        "| tool | seed | trials | search (own) | search | held-out | held-out (lm-eval hf) "
        "| trials/h | optimizer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in runs:
        check = "-" if math.isnan(r.lm_eval_held_out) else f"{r.lm_eval_held_out:.4f}"
        print(
            f"| {r.tool} | {r.seed} | {r.trials} | {r.own_search:.4f} | {r.search:.4f} | "
            f"{r.held_out:.4f} | {check} | {r.per_hour:,.0f} | {r.settings} |"
        )
    print()
    for tool in dict.fromkeys(r.tool for r in runs):
        mine = [r for r in runs if r.tool == tool]
        search = statistics.mean(r.search for r in mine)
        held = [r.held_out for r in mine]
        spread = f" (min {min(held):.4f}, max {max(held):.4f})" if len(held) > 1 else ""
        print(
            f"{tool}: {len(mine)} seed(s), mean search {search:.4f}, "
            f"mean held-out {statistics.mean(held):.4f}{spread}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-vs-mergekit"))
    parser.add_argument("--venv", type=Path, default=Path("/work/venvs/mergekit"))
    parser.add_argument("--setup", action="store_true", help="build the mergekit venv and stop")
    parser.add_argument("--trials", type=int, default=60, help="mergekit-evolve's --max-fevals")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="mergebot's")
    parser.add_argument("--mergekit-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--examples", type=int, default=200, help="search rows per task")
    parser.add_argument("--held-out", type=int, default=200, help="held-out rows per task")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["shipped"],
        choices=list(VARIANTS),
        help="mergebot's optimizer as it is, or ablations towards mergekit-evolve's settings",
    )
    parser.add_argument(
        "--filters",
        nargs="*",
        default=[],
        help="tensor filters with values of their own in both genomes (self_attn mlp: 48 genes)",
    )
    parser.add_argument(
        "--lm-eval-check",
        action="store_true",
        help="also score each winner's held-out split with lm-eval's own hf model (in the venv)",
    )
    parser.add_argument("--variant", default="shipped", help=argparse.SUPPRESS)
    parser.add_argument("--child-mergebot", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mergebot:
        child_mergebot(*args.child_mergebot, args.variant)
        return
    if args.setup:
        setup_venv(args.venv)
        return
    if not (args.venv / "bin" / "mergekit-evolve").is_file():
        raise SystemExit(f"no mergekit venv at {args.venv}; build it with --setup first")
    args.work.mkdir(parents=True, exist_ok=True)
    task = make_task(args.work, args.examples, args.held_out)
    runs = [
        run_mergekit(task, args.work, args.venv, s, args.trials, args.filters)
        for s in args.mergekit_seeds
    ]
    budget = runs[0].trials if runs else args.trials
    runs += [
        run_mergebot(task, args.work, s, budget, v, args.filters)
        for v in args.variants
        for s in args.seeds
    ]
    for run in runs:
        run.search, run.held_out = score(task, run.model)
        if args.lm_eval_check:
            run.lm_eval_held_out = lm_eval_held_out(task, args.venv, run.model)
    print_table(runs)
    (args.work / "runs.json").write_text(
        json.dumps([{**r.__dict__, "model": str(r.model), "per_hour": r.per_hour} for r in runs])
    )


if __name__ == "__main__":
    main()
