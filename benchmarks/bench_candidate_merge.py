"""A parameter-space search's TIES candidate three ways, on the ~100M-parameter Llama family
of ``bench_evolve.py``: merged from scratch (a k-th value selection per tensor per trial, as
before the magnitude order was kept), with each task vector's magnitude order kept between
trials (eager kernels), and kept order with the kernels compiled (``torch.compile``: one pass
over memory per tensor), as a search of a model this size runs.

    python benchmarks/bench_candidate_merge.py [--work /tmp/mergebot-bench-evolve] [--small] [--trials 6]

All three run in this process with one torch thread, in turn trial by trial on the same random
4-decimal weights and densities (as a search draws them), so the machine's load falls on all
alike; the figures are ratios of their median times, and every trial's three candidates are
checked equal bit for bit. The first trial of a kept order pays the one sort per tensor (and,
compiled, the compile) and is reported on its own.
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
    kept = ParameterCandidate(loaded, recipes[0].donor(), dtype, device, compiled=False)
    compiled = ParameterCandidate(loaded, recipes[0].donor(), dtype, device, compiled=True)
    fresh = ParameterCandidate(loaded, recipes[0].donor(), dtype, device, compiled=False)

    first = seconds(kept.build, recipes[0])
    first_compiled = seconds(compiled.build, recipes[0])
    kept_times, compiled_times, fresh_times = [], [], []
    for recipe in recipes[1:]:
        kept_times.append(seconds(kept.build, recipe))
        compiled_times.append(seconds(compiled.build, recipe))
        fresh_times.append(seconds(from_scratch, fresh, recipe))
        for name, tensor in kept.state.items():
            assert torch.equal(tensor, fresh.state[name]), name
            assert torch.equal(tensor, compiled.state[name]), name

    params = sum(t.numel() for t in kept.state.values())
    fresh_median, kept_median, compiled_median = (
        statistics.median(times) for times in (fresh_times, kept_times, compiled_times)
    )
    print(
        f"TIES candidate, {params / 1e6:.1f}M parameters, 2 models + base, 1 thread, {args.trials} trials each"
    )
    print(f"  first trial, kept order (sorts once):               {first:.2f} s")
    print(f"  first trial, kept order compiled (sorts, compiles): {first_compiled:.2f} s")
    print(f"  from scratch (k-th value per tensor):     median {fresh_median:.3f} s")
    print(f"  kept order, eager kernels:                median {kept_median:.3f} s")
    print(f"  kept order, compiled kernels:             median {compiled_median:.3f} s")
    print(
        f"  ratios: from scratch / kept {fresh_median / kept_median:.2f}x, "
        f"kept / compiled {kept_median / compiled_median:.2f}x, "
        f"from scratch / compiled {fresh_median / compiled_median:.2f}x (all equal bit for bit)"
    )


if __name__ == "__main__":
    main()
