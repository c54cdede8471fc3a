"""Time of Git Re-Basin weight matching (merge_engine.align) on the CPU, by layer width and on
a whole ~100M-parameter Llama-style model.

    python benchmarks/bench_align.py [--widths 512 1024 2048 4096 8192] [--no-llama]

Widths: two independently initialised MLPs 784-w-w-10 (two groups of w units). For each width:
the whole matching (all passes until no group improves), the number of passes, and the two
parts of one coordinate step on the first group, timed alone: the score matrix (a w×(784+w)
by (784+w)×w product, O(n²·m)) and the linear assignment on it (scipy's
``linear_sum_assignment``, O(n³) in the worst case). Random models are the hard case for the
solver: trained ones have more structure.

Llama: hidden 768, 12 layers, 12 query / 4 key-value heads, MLP 2048, vocab 16000, untied head
(about 100M parameters): 24 groups per pass (12 of 2048 units, 12 of 12 heads).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from merge_engine.align import spec_for, weight_matching
from merge_engine.align.weight_matching import group_scores


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def time_width(width: int, max_iter: int) -> dict[str, float]:
    a, b = mlp(width, 0), mlp(width, 1)
    spec = spec_for(a)
    sa, sb = a.state_dict(), b.state_dict()
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    start = time.perf_counter()
    scores, _ = group_scores("0.out", spec, sa, sb, perms, spec.touching()["0.out"])
    scores_s = time.perf_counter() - start
    start = time.perf_counter()
    linear_sum_assignment(scores.numpy(), maximize=True)
    solve_s = time.perf_counter() - start
    _, report = weight_matching(a, b, max_iter=max_iter)
    return {
        "width": width,
        "scores_s": scores_s,
        "solve_s": solve_s,
        "passes": report.iterations,
        "converged": report.converged,
        "total_s": report.seconds,
    }


def llama(seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def time_llama(max_iter: int) -> None:
    a, b = llama(0), llama(1)
    params = sum(p.numel() for p in a.parameters())
    _, report = weight_matching(a, b, max_iter=max_iter)
    per_pass = report.seconds / report.iterations
    print(
        f"\nLlama-style, {params / 1e6:.0f}M parameters: {report.seconds:.1f}s, {report.iterations} "
        f"passes ({per_pass:.1f}s per pass of 24 groups), converged {report.converged}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--no-llama", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'width':>6} {'scores (s)':>11} {'assignment (s)':>15} {'passes':>7} {'total (s)':>10}")
    for width in args.widths:
        row = time_width(width, args.max_iter)
        mark = "" if row["converged"] else " (max_iter)"
        print(
            f"{width:>6} {row['scores_s']:>11.3f} {row['solve_s']:>15.3f} {row['passes']:>7} "
            f"{row['total_s']:>10.2f}{mark}",
            flush=True,
        )
    if not args.no_llama:
        time_llama(args.max_iter)


if __name__ == "__main__":
    main()
