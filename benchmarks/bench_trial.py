"""A whole ``parameters`` trial of a search at ~100M parameters (merge + evaluation +
optimizer), against its floor and, with ``--baseline``, against an older checkout, in one run.

    python benchmarks/bench_trial.py [--work /tmp/mergebot-bench-evolve] [--trials 12]
                                     [--baseline DIR] [--small]

The search is ``bench_evolve.py``'s: a base and two fine-tunes of a 99M-parameter Llama, its two
tasks (64 ``nll`` texts, 64 ``exact_match`` prompts with ``max_new_tokens: 4``), TIES over weight
and density per layer, run as ``mergebot evolve`` in its own process with one torch thread.
From the study database: the mean trial (merge + evaluation), the merge's share of it, and the
stage's wall clock per trial, which adds the optimizer and the database.

The floor is the same evaluation done by transformers alone, in this process on one thread, on
the base model (a candidate has its shapes): one forward per batch of texts for ``nll``, greedy
``generate`` with the attention cache over prompts grouped by length for ``exact_match``, in
batches of mergebot's default size; best of 3, before and after the searches (the mean is the
floor). Goal: a trial's stage wall clock at most 1.5×
the floor, the merge under 10 % of a trial.

``--baseline DIR``: a checkout of an older mergebot (``git worktree add /tmp/old fd8c244``, the
commit before the evaluation cache, the kept magnitude order and the compiled kernels). Its
search runs between two runs of this checkout's, so the machine's load falls on both alike;
trials per hour are compared against the mean of this checkout's two runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

import bench_evolve  # noqa: E402  (the model family, the tasks, running and reading a search)
from bench_evaluation import best_of, floor  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from merge_engine.evolve.decoding import default_batch_size  # noqa: E402


def nll_floor(model, tokenizer, texts: list[str], batch: int) -> None:
    """One forward per batch of equally long texts and their tokens' log-likelihoods."""
    groups: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        groups.setdefault(len(ids), []).append(ids)
    with torch.no_grad():
        for group in groups.values():
            for start in range(0, len(group), batch):
                ids = torch.tensor(group[start : start + batch])
                logits = model(input_ids=ids).logits[:, :-1].float()
                logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()


def floor_seconds(model_dir: Path, tasks: list[dict]) -> float:
    """The floor of one trial's evaluation (see the module's docstring)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [row["text"] for row in tasks[0]["data"]["examples"]]
    rows = tasks[1]["data"]["examples"]
    new_tokens = tasks[1]["max_new_tokens"]
    text_length = max(len(tokenizer(t)["input_ids"]) for t in texts)
    prompt_length = max(len(tokenizer(r["prompt"])["input_ids"]) for r in rows)
    nll_batch = default_batch_size(model, "cpu", text_length, text_length)
    match_batch = default_batch_size(model, "cpu", prompt_length + new_tokens, 1)

    def evaluation() -> None:
        nll_floor(model, tokenizer, texts, nll_batch)
        floor(model, tokenizer, rows, match_batch, "cpu", new_tokens)

    return best_of(3, evaluation)


def run_search(label: str, repo: Path, spec: Path, out: Path) -> bench_evolve.StageFigures:
    """``mergebot evolve`` of ``repo`` (this checkout or the baseline) on one thread, run in
    ``repo`` so that ``python -m`` imports its code (the current directory comes first)."""
    shutil.rmtree(out, ignore_errors=True)
    bench_evolve.ENV.update(
        PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1"
    )
    command = [sys.executable, "-m", "merge_engine.cli", "evolve", str(spec), str(out)]
    print(f"  {label}: mergebot evolve ({repo}) ...", flush=True)
    bench_evolve.run_process(
        [*command, "--device", "cpu", "--quiet"], out.with_suffix(".log"), cwd=repo
    )
    stage = bench_evolve.stage_figures(out)["parameters"]
    print(
        f"    {stage.trials} trials: {stage.mean:.2f} s each (merge {stage.mean_merge:.2f} s), "
        f"{stage.wall / stage.trials:.2f} s per trial of stage wall",
        flush=True,
    )
    return stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench-evolve"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--baseline", type=Path, help="an older mergebot checkout")
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the script")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"

    mode = bench_evolve.MODES["small" if args.small else "full"]
    work = args.work / ("small" if args.small else "full")
    models = bench_evolve.make_models(work, mode)
    tasks = bench_evolve.tasks(mode)
    spec = bench_evolve.write_spec(
        work / "trial.yaml", "parameters", models, tasks, args.trials, mode
    )
    params = bench_evolve.parameter_count(models["base"])
    print(f"{params / 1e6:.1f}M parameters, {args.trials} trials per search, one thread each")

    floors = [floor_seconds(models["base"], tasks)]
    ours = [run_search("this checkout", REPO, spec, work / "trial-this-1")]
    if args.baseline:
        old = run_search("baseline", args.baseline.resolve(), spec, work / "trial-baseline")
        ours.append(run_search("this checkout, again", REPO, spec, work / "trial-this-2"))
    floors.append(floor_seconds(models["base"], tasks))
    lowest = statistics.mean(floors)

    mean = statistics.mean(s.mean for s in ours)
    merge = statistics.mean(s.mean_merge for s in ours)
    wall = statistics.mean(s.wall / s.trials for s in ours)
    print()
    print(
        f"evaluation floor (transformers alone, best of 3):  {lowest:.2f} s "
        f"(before the searches {floors[0]:.2f} s, after {floors[1]:.2f} s)"
    )
    print(
        f"trial, merge + evaluation:                         {mean:.2f} s ({mean / lowest:.2f}x the floor)"
    )
    print(
        f"trial, stage wall clock (adds the optimizer, db):  {wall:.2f} s ({wall / lowest:.2f}x the floor)"
    )
    print(f"merge share of a trial:                            {merge / mean:.1%} ({merge:.2f} s)")
    print(f"trials per hour (stage wall):                      {3600 / wall:.0f}")
    if args.baseline:
        old_wall = old.wall / old.trials
        print(
            f"baseline: {old.mean:.2f} s per trial (merge {old.mean_merge:.2f} s), "
            f"{3600 / old_wall:.0f} trials per hour; this checkout {old_wall / wall:.2f}x as many"
        )


if __name__ == "__main__":
    main()
