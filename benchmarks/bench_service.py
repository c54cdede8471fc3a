"""What the bot adds to a merge: one job through ``mergebot serve`` (API, pre-flight against the
sandbox hub, pinned download over HTTP, merge, verify, card, push) against the bare engine
merging the same local folders, in the same run. Prints each stage's time and the ratio.

    python benchmarks/bench_service.py [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from service_env import start_sandbox, start_serve, ties_recipe  # noqa: E402

from merge_engine import merge, parse_recipe, preflight  # noqa: E402
from merge_engine.example import make_family  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = dict(
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
        )
        base, (a, b) = make_family(work / "models", "llama", finetunes=2, **size)
        params = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 4 / 1e6
        print(f"3 models of {params:.0f}M float32 parameters")

        recipe = parse_recipe(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [
                    {"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}},
                ],
            }
        )
        started = time.perf_counter()
        merge(preflight(recipe), work / "engine-out", show_progress=False)
        engine = time.perf_counter() - started

        sandbox = start_sandbox({"alice": (base, [a, b])})
        serve, api = start_serve(sandbox.url, work / "bot")
        try:
            started = time.perf_counter()
            _, job = api.submit(ties_recipe("alice"), "alice/bench", "tok-alice")
            submitted = time.perf_counter() - started
            done = api.wait_done(job["id"], deadline=3600)
            total = time.perf_counter() - started
        finally:
            serve.stop()
            sandbox.__exit__()
        assert done["status"] == "succeeded", done
        print(f"engine merge (local folders): {engine:.2f} s")
        print(f"bot job, submit answered in {submitted:.2f} s, published after {total:.2f} s")
        for line in done["log"]:
            if "done in" in line:
                print(f"  {line}")
        print(f"ratio bot / engine: {total / engine:.2f}")


if __name__ == "__main__":
    main()
