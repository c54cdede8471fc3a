"""Baking a LoRA adapter while merging, against merging a model the adapter was baked into
beforehand: time and peak memory in the same run, on bench_merge's ~400M-parameter Llama.

    python benchmarks/bench_lora_bake.py --work /tmp/mergebot-bench [--rank 64] [--repeats 2]

The adapter is a PEFT LoRA of rank ``--rank`` on every linear module of the layers (q, k, v,
o, gate, up, down), written as PEFT saves one (``adapter_config.json`` and
``adapter_model.safetensors``). Cases, each in its own process with one torch thread, in
alternating order ``--repeats`` times:
- ``adapter``: ``linear`` of ``a+adapter`` and ``b``: the adapter applied tensor by tensor
  while the merge streams;
- ``baked``: ``linear`` of ``a_baked`` and ``b``, where ``a_baked`` is ``a`` with the adapter
  added beforehand (the work a user saves by not baking first; not timed).
Both outputs are compared tensor by tensor. Memory is sampled as bench_merge does: total RSS
(with the pages of memory-mapped inputs) and private (the process's own heap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402  (the ~400M Llama, writing it, measuring a child process)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE = "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n"


def targeted(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The weights the adapter changes, in the model's order."""
    return [n for n in shapes if n.endswith(".weight") and n.split(".")[-2] in TARGETS]


def write_adapter(folder: Path, rank: int) -> None:
    """A PEFT LoRA of ``rank`` on every targeted weight: random A, and B non-zero (a trained
    adapter's B is not the zeros PEFT starts from)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = bench_merge.llama_shapes()
    tensors = {}
    for index, name in enumerate(targeted(shapes)):
        out_features, in_features = shapes[name]
        g = torch.Generator().manual_seed(index)
        module = f"base_model.model.{name.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": "a",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def bake(model: Path, adapter: Path, out: Path, rank: int) -> None:
    """``model`` with the adapter added, written shard for shard (the baseline's input)."""
    out.mkdir(parents=True, exist_ok=True)
    scale = 2.0  # lora_alpha / r
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    lora = safe_open(str(adapter / "adapter_model.safetensors"), framework="pt")
    for file in sorted(set(index.values())):
        tensors = {}
        with safe_open(str(model / file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118  (a safe_open handle is not iterable)
                tensor = shard.get_tensor(name)
                if name.split(".")[-2] in TARGETS:
                    module = f"base_model.model.{name.removesuffix('.weight')}"
                    up = lora.get_tensor(f"{module}.lora_B.weight")
                    down = lora.get_tensor(f"{module}.lora_A.weight")
                    tensor += (up @ down) * scale
                tensors[name] = tensor
        save_file(tensors, out / file, metadata={"format": "pt"})
    for name in ("model.safetensors.index.json", "config.json"):
        (out / name).write_bytes((model / name).read_bytes())


def child(case: str, work: Path, out: Path) -> None:
    torch.set_num_threads(1)
    from merge_engine import load_recipe, merge, preflight

    merge(
        preflight(load_recipe(work / f"lora-{case}.yaml")),
        out,
        device="cpu",
        shard_size=bench_merge.SHARD,
        show_progress=False,
    )


def max_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between two outputs' tensors of the same names."""

    def files(folder: Path) -> dict[str, Path]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as shard:
                found.update(dict.fromkeys(shard.keys(), file))
        return found

    worst = 0.0
    theirs = files(second)
    for name, file in files(first).items():
        with safe_open(str(file), framework="pt") as a, safe_open(str(theirs[name]), "pt") as b:
            worst = max(worst, (a.get_tensor(name) - b.get_tensor(name)).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.out)
        return

    work = args.work
    for name, seed, base_seed in (("base", 0, None), ("a", 1, 0), ("b", 2, 0)):
        if not (work / name / "config.json").is_file():
            print(f"writing {name} ...", flush=True)
            bench_merge.write_model(work / name, seed, base_seed)
    adapter = work / f"adapter-r{args.rank}"
    baked = work / f"a-baked-r{args.rank}"
    if not (adapter / "adapter_config.json").is_file():
        write_adapter(adapter, args.rank)
    if not (baked / "config.json").is_file():
        print("baking the baseline's input ...", flush=True)
        bake(work / "a", adapter, baked, args.rank)
    recipes = {"adapter": f"{work / 'a'}+{adapter}", "baked": str(baked)}
    for case, a in recipes.items():
        (work / f"lora-{case}.yaml").write_text(RECIPE.format(a=a, b=work / "b"))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in recipes}
    for repeat in range(args.repeats):
        order = list(recipes) if repeat % 2 == 0 else list(reversed(recipes))
        for case in order:
            out = work / f"out-lora-{case}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            command = [sys.executable, __file__, "--work", str(work), "--child", case]
            result = bench_merge.measure([*command, "--out", str(out)], env=env)
            runs[case].append(result)
            print(f"{case:8s} run {repeat + 1}: {result}", flush=True)
    difference = max_difference(work / "out-lora-adapter", work / "out-lora-baked")
    print(f"\nrank {args.rank}, {len(targeted(bench_merge.llama_shapes()))} adapted weights")
    print(f"{'case':8s} {'wall s':>8s} {'peak RSS GB':>12s} {'peak private GB':>16s}")
    medians = {}
    for case, results in runs.items():
        medians[case] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        m = medians[case]
        print(f"{case:8s} {m['wall_s']:8.2f} {m['peak_rss_gb']:12.2f} {m['peak_private_gb']:16.2f}")
    ratio = medians["adapter"]["wall_s"] / medians["baked"]["wall_s"]
    print(
        f"adapter / baked wall time: {ratio:.2f}x; largest difference between outputs: {difference:.3g}"
    )


if __name__ == "__main__":
    main()
