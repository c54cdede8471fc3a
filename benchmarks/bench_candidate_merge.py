"""A parameter-space search's TIES candidate with each task vector's magnitude order kept
between trials, against the same candidate merged from scratch (a k-th value selection per
tensor per trial, as before the order was kept), on the ~100M-parameter Llama family of
``bench_evolve.py``.

    python benchmarks/bench_candidate_merge.py [--work /tmp/mergebot-bench-evolve] [--small] [--trials 6]

Both run in this process with one torch thread, alternating trial by trial on the same random
4-decimal weights and densities (as a search draws them), so the machine's load falls on both
alike; the figure is the ratio of their median times. The first kept-order trial pays the one
sort per tensor and is reported on its own.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_evolve  # noqa: E402  (the same model family)

from merge_engine.evolve.candidates import ParameterCandidate, load_source, output_dtype  # noqa: E402
from merge_engine.evolve.genome import ParameterGenes  # noqa: E402
from merge_engine.evolve.spec import ParameterGenome  # noqa: E402
from merge_engine.methods import get_method  # noqa: E402
from merge_engine.plan.planner import build_plan  # noqa: E402
from merge_engine.recipe.schema import ModelReference, Recipe  # noqa: E402
from merge_engine.run.executor import iter_merged  # noqa: E402


def from_scratch(candidate: ParameterCandidate, recipe: Recipe) -> None:
    """The candidate as it was merged before the order was kept."""
    plan = build_plan(recipe, candidate.sources)
    with torch.no_grad():
        for task, tensor in iter_merged(plan, candidate.device):
            candidate.state[task.output].copy_(tensor)


def seconds(work, *args) -> float:
    start = time.perf_counter()
    work(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench-evolve"))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)

    mode = bench_evolve.MODES["small" if args.small else "full"]
    models = bench_evolve.make_models(args.work / ("small" if args.small else "full"), mode)
    refs = [ModelReference(str(models[key])) for key in ("base", "a", "b")]
    device = torch.device("cpu")
    loaded = {ref: load_source(ref, device, None, False, None) for ref in refs}
    genome = ParameterGenome(
        method="ties", search={"weight": (0.0, 1.0), "density": (0.1, 1.0)}, layers_per_value=1
    )
    layers = mode.model["num_hidden_layers"]
    genes = ParameterGenes(genome, get_method("ties"), refs[1:], refs[0], layers, seed=0)
    rng = random.Random(0)
    recipes = [
        genes.recipe({g.name: rng.uniform(g.low, g.high) for g in genes.genes})
        for _ in range(args.trials + 1)
    ]
    dtype = output_dtype(recipes[0], loaded)
    kept = ParameterCandidate(loaded, recipes[0].donor(), dtype, device)
    fresh = ParameterCandidate(loaded, recipes[0].donor(), dtype, device)

    first = seconds(kept.build, recipes[0])
    kept_times, fresh_times = [], []
    for recipe in recipes[1:]:
        kept_times.append(seconds(kept.build, recipe))
        fresh_times.append(seconds(from_scratch, fresh, recipe))
        assert all(torch.equal(kept.state[n], fresh.state[n]) for n in kept.state)

    params = sum(t.numel() for t in kept.state.values())
    kept_median, fresh_median = statistics.median(kept_times), statistics.median(fresh_times)
    print(
        f"TIES candidate, {params / 1e6:.1f}M parameters, 2 models + base, 1 thread, {args.trials} trials each"
    )
    print(f"  first trial with kept order (sorts once): {first:.2f} s")
    print(f"  from scratch (k-th value per tensor):     median {fresh_median:.2f} s")
    print(f"  kept order (threshold lookup):            median {kept_median:.2f} s")
    print(
        f"  ratio from scratch / kept: {fresh_median / kept_median:.2f}x (candidates equal bit for bit)"
    )


if __name__ == "__main__":
    main()
