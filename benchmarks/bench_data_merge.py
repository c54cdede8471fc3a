"""Time and peak memory of the merges that use data on the ~480M-parameter Llama-style
checkpoints of ``bench_merge.py``: the statistics pass (each model run over its calibration
samples) and the streaming merge, next to baselines measured in the same run.

    python benchmarks/bench_data_merge.py --work /tmp/mergebot-bench [--samples 256 --tokens 64]

Cases, each in its own process (memory sampled as in ``bench_merge.py``):
- ``linear``: the plain average of the two models (the merge pass alone costs about this);
- ``forward``: the two models loaded with transformers and run over the same batches, nothing
  collected (the floor of the Gram statistics pass);
- ``regmean``: statistics pass + merge, from an empty statistics folder;
- ``regmean again``: the same recipe with another alpha: statistics read back, merge only;
- ``backward``: per-example forward + backward over the Fisher samples, nothing collected;
- ``fisher``: statistics pass (per-example squared gradients) + merge.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import measure, write_model  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog 0123456789 () [] {} <> += -* /% &|"


def write_calibration(path: Path, samples: int, tokens: int) -> None:
    """``samples`` lines of ``tokens`` characters (the benchmark tokenizer is per character)."""
    long = TEXT * ((samples + tokens) // len(TEXT) + 2)
    lines = [long[i : i + tokens] for i in range(samples)]
    path.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")


def recipe(work: Path, method: str, samples: int, extra: str = "") -> str:
    calibration = f"{{path: {work / 'calibration.jsonl'}, samples: {samples}, max_length: 512}}"
    return (
        f"merge_method: {method}\nmodels: [{{model: {work / 'a'}}}, {{model: {work / 'b'}}}]\n"
        f"calibration: {calibration}\n{extra}"
    )


def child(case: str, work: Path, out: Path, samples: int, fisher_samples: int) -> None:
    import yaml

    from merge_engine import merge, parse_recipe, preflight
    from merge_engine.data.calibration import batches
    from merge_engine.run.statistics import collect_statistics

    timings: dict[str, float] = {}
    if case in ("forward", "backward"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        count = samples if case == "forward" else fisher_samples
        plan = preflight(parse_recipe(yaml.safe_load(recipe(work, "regmean", count))))
        start = time.perf_counter()
        for ref, source in plan.calibration.items():
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
            for batch in batches(source, AutoTokenizer.from_pretrained(ref.path)):
                if case == "forward":
                    with torch.no_grad():
                        model(**batch)
                    continue
                for row in range(len(batch["input_ids"])):
                    model.zero_grad(set_to_none=True)
                    one = {k: v[row : row + 1] for k, v in batch.items()}
                    model(**one).logits.float().log_softmax(-1).sum().backward()
            del model
        timings["pass_s"] = time.perf_counter() - start
    else:
        method, extra = {
            "linear": ("linear", "parameters: {weight: 0.5}\n"),
            "regmean": ("regmean", ""),
            "regmean again": ("regmean", "parameters: {alpha: 0.5}\n"),
            "fisher": ("fisher", ""),
        }[case]
        count = fisher_samples if case == "fisher" else samples
        plan = preflight(parse_recipe(yaml.safe_load(recipe(work, method, count, extra))))
        start = time.perf_counter()
        if plan.method.needs_data:
            collect_statistics(plan, work / "statistics", torch.device("cpu"), False)
        timings["stats_s"] = time.perf_counter() - start
        merge(plan, out, device="cpu", show_progress=False, stats_dir=work / "statistics")
        timings["merge_s"] = time.perf_counter() - start - timings["stats_s"]
    (work / f"timings-{case.replace(' ', '-')}.json").write_text(json.dumps(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--samples", type=int, default=256, help="RegMean calibration samples")
    parser.add_argument("--fisher-samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.out, args.samples, args.fisher_samples)
        return

    from merge_engine.example import save_tiny_tokenizer

    work = args.work
    for name, seed, base_seed in (("a", 1, 0), ("b", 2, 0)):
        if not (work / name / "config.json").is_file():
            print(f"writing {name} ...", flush=True)
            write_model(work / name, seed, base_seed)
        save_tiny_tokenizer(work / name)
    write_calibration(work / "calibration.jsonl", args.samples, args.tokens)
    shutil.rmtree(work / "statistics", ignore_errors=True)
    print(
        f"two ~480M-parameter float32 models; {args.samples} samples x {args.tokens} tokens "
        f"(RegMean), {args.fisher_samples} (Fisher); CPU, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = {}
    for case in ("linear", "forward", "regmean", "regmean again", "backward", "fisher"):
        out = work / f"out-{case.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, __file__, "--work", str(work), "--child", case]
        command += ["--out", str(out), "--samples", str(args.samples)]
        command += ["--fisher-samples", str(args.fisher_samples)]
        r = measure(command)
        r |= json.loads((work / f"timings-{case.replace(' ', '-')}.json").read_text())
        results[case] = r
        shutil.rmtree(out, ignore_errors=True)
        parts = ", ".join(
            f"{k} {v:.1f}" for k, v in r.items() if k.endswith("_s") and k != "wall_s"
        )
        print(
            f"{case:14} {r['wall_s']:7.1f} s ({parts})  peak total {r['peak_rss_gb']:.2f} GB  "
            f"peak private {r['peak_private_gb']:.2f} GB",
            flush=True,
        )
    gram = results["regmean"]["stats_s"] / results["forward"]["pass_s"]
    fisher = results["fisher"]["stats_s"] / results["backward"]["pass_s"]
    merge_ratio = results["regmean again"]["merge_s"] / results["linear"]["merge_s"]
    print(f"Gram statistics pass / plain forward passes: {gram:.2f}x")
    print(f"Fisher statistics pass / plain per-example backward passes: {fisher:.2f}x")
    print(f"RegMean merge from saved statistics / linear merge: {merge_ratio:.2f}x")
    (work / "data-results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
