"""Wall time of ``mergebot`` commands that should start fast, next to ``python -c "import torch"``
measured in the same run (the floor of any command that does touch torch).

    python benchmarks/bench_cli_startup.py [--runs 5] [--work /tmp/mergebot-startup]

Each command runs ``--runs`` times in a fresh process; the table shows the median and its
ratio to the torch import. ``validate`` checks a tiny local TIES recipe made by
:func:`merge_engine.example.make_family` (configs and safetensors headers only).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mergebot_command() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim, whose own
    start-up would be timed too), or ``python -m service.cli`` without one."""
    script = Path(sys.executable).with_name("mergebot")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


def make_recipe(work: Path) -> Path:
    """A tiny local base and two fine-tunes, and a TIES recipe over them."""
    from merge_engine.example import EXAMPLE_RECIPE, make_family

    base, (a, b) = make_family(work / "models")
    recipe = work / "recipe.yaml"
    recipe.write_text(EXAMPLE_RECIPE.format(base=base, a=a, b=b), encoding="utf-8")
    return recipe


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall time of ``runs`` fresh processes; a failing command stops the benchmark."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(results: dict[str, float], baseline: str) -> str:
    lines = ["| command | median s | x import torch |", "|---|---:|---:|"]
    lines += [
        f"| `{name}` | {seconds:.2f} | {seconds / results[baseline]:.2f} |"
        for name, seconds in results.items()
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, help="where the tiny models go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = make_recipe(args.work or Path(tmp))
        mergebot = mergebot_command()
        baseline = 'python -c "import torch"'
        commands = {
            baseline: [sys.executable, "-c", "import torch"],
            "mergebot --help": [*mergebot, "--help"],
            "mergebot methods": [*mergebot, "methods"],
            "mergebot validate recipe.yaml": [*mergebot, "validate", str(recipe)],
        }
        results = {name: median_seconds(command, args.runs) for name, command in commands.items()}
    print(f"median of {args.runs} runs each, {' '.join(mergebot)}\n")
    print(table(results, baseline))


if __name__ == "__main__":
    main()
