"""Time and peak memory of mergebot's merges on ~400M-parameter Llama-style checkpoints,
next to the floor measured in the same run: reading every input tensor and writing one
output with plain safetensors. With ``--mergekit PATH`` the same recipes also run through
mergekit (not a project dependency) and the ratios are reported.

    python benchmarks/bench_merge.py --work /tmp/mergebot-bench [--mergekit .../mergekit-yaml]

Each case runs in its own process; the parent samples its memory every 50 ms from
/proc/PID/status: total = VmRSS (includes the pages of memory-mapped input files, which the
kernel can drop at any time), private = RssAnon (the process's own heap: tensors, buffers). Inputs are float32: hidden 2048, intermediate 5632, 8 layers,
vocab 16000, a base and two perturbed copies, each in two input shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 2048, 5632, 8, 16000
SHARD = 10**9
CASES = {
    "linear": "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}]\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}]\nrandom_seed: 0\n",
}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_model(folder: Path, seed: int, base_seed: int | None) -> None:
    """A checkpoint in two shards; a fine-tune is the base (same seed) plus small noise."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes()
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for index, part in enumerate(halves):
        tensors = {}
        for name in part:
            g = torch.Generator().manual_seed(
                hash((base_seed if base_seed is not None else seed, name)) % 2**31
            )
            tensor = torch.randn(shapes[name], generator=g) * 0.02
            if base_seed is not None:
                tensor += (
                    torch.randn(shapes[name], generator=torch.Generator().manual_seed(seed)) * 0.002
                )
            tensors[name] = tensor
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(folder)


def floor(models: list[Path], out: Path) -> None:
    """Read every input tensor; write one output, in 1 GB shards, with plain safetensors."""
    out.mkdir(parents=True)
    index = json.loads((models[0] / "model.safetensors.index.json").read_text())["weight_map"]
    handles = {}
    pending, size, shard = {}, 0, 0
    for name in llama_shapes():
        tensors = []
        for model in models:
            key = (model, index[name])
            if key not in handles:
                handles[key] = safe_open(str(model / index[name]), framework="pt")
            tensors.append(handles[key].get_tensor(name))
        pending[name] = tensors[0]
        size += tensors[0].numel() * 4
        del tensors
        if size >= SHARD:
            save_file(pending, out / f"shard-{shard}.safetensors", metadata={"format": "pt"})
            pending, size, shard = {}, 0, shard + 1
    if pending:
        save_file(pending, out / f"shard-{shard}.safetensors", metadata={"format": "pt"})


def child(case: str, work: Path, out: Path) -> None:
    models = [work / "base", work / "a", work / "b"]
    if case == "floor":
        floor(models, out)
        return
    from merge_engine import load_recipe, merge, preflight

    merge(
        preflight(load_recipe(work / f"{case}.yaml")),
        out,
        device="cpu",
        shard_size=SHARD,
        show_progress=False,
    )


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_rss = peak_anon = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            peak_rss = max(peak_rss, int(fields["VmRSS"].split()[0]) * 1024)
            peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{command} failed: {process.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_gb": peak_rss / 1e9, "peak_private_gb": peak_anon / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--mergekit", help="path of a mergekit-yaml executable to compare with")
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
            write_model(work / name, seed, base_seed)
    models = {"base": work / "base", "a": work / "a", "b": work / "b"}
    for case, text in CASES.items():
        (work / f"{case}.yaml").write_text(text.format(**models))

    results = {}
    runs = (
        [("floor", "floor")]
        + [(c, c) for c in CASES]
        + ([(f"mergekit {c}", c) for c in CASES] if args.mergekit else [])
    )
    for label, case in runs:
        out = work / f"out-{label.replace(' ', '-')}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        if label.startswith("mergekit"):
            command = [
                args.mergekit,
                str(work / f"{case}.yaml"),
                str(out),
                "--out-shard-size",
                "1B",
                "--random-seed",
                "0",
                "--quiet",
            ]
        else:
            command = [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--child",
                case,
                "--out",
                str(out),
            ]
        results[label] = measure(command)
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = results[label]
        print(
            f"{label:18} {r['wall_s']:7.1f} s  ({r['wall_s'] / results['floor']['wall_s']:.2f}x floor)  "
            f"peak total {r['peak_rss_gb']:.2f} GB  peak private {r['peak_private_gb']:.2f} GB",
            flush=True,
        )
    for case in CASES:
        if f"mergekit {case}" in results:
            ratio = results[f"mergekit {case}"]["wall_s"] / results[case]["wall_s"]
            memory = (
                results[f"mergekit {case}"]["peak_private_gb"] / results[case]["peak_private_gb"]
            )
            print(
                f"mergekit / mergebot, {case}: time {ratio:.2f}x, peak private memory {memory:.2f}x"
            )
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
