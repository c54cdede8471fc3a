"""``mergebot extract-lora`` against ``mergekit-extract-lora`` at rank 64 on a ~480M-parameter
Llama-style model, in the same run: wall time, peak memory, and each adapter's reconstruction
error measured here (not taken from either tool).

    OMP_NUM_THREADS=1 python benchmarks/bench_extract_lora.py [--work /tmp/mergebot-extract-bench] \\
        [--mergekit /work/venvs/mergekit/bin/mergekit-extract-lora] [--rank 64] [--repeats 2]

About 3 minutes per run of either tool on one thread here, and a minute to write the models
once. With ``--repeats`` the tools run alternately and each one's fastest run is reported
(the machine is shared; its other load varies).

The models are those of ``bench_merge.py`` (float32, hidden 2048, intermediate 5632, 8
layers, vocab 16000, two shards): its base, and a fine-tune that is the base plus, per tensor,
a rank-48 update with decaying singular values and a full-rank noise 20 times smaller (a
difference a rank-64 adapter captures most of, as with real fine-tunes, not pure noise).

Both tools write the same adapter: every linear layer of the transformer layers factored at
rank 64 by a full float32 SVD; the embeddings, the head and the norms stored whole
(``modules_to_save``), which is mergekit-extract-lora's default and mergebot's ``--save``.
mergekit is installed only in its benchmark venv (see ``bench_vs_mergekit_evolve.py``) and
runs as a subprocess; it is not a dependency of mergebot. Every process runs with one torch
thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``), on the CPU.

Memory, sampled every 50 ms from /proc/PID/status as ``bench_merge.py`` does: total = VmRSS
(includes the pages of memory-mapped inputs, which the kernel may drop at any time), private =
RssAnon (the process's own heap). Error: per module, ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F in float64
from the written factors; the mean and the largest over the modules, and the largest
difference between the two tools' errors on one module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import llama_shapes, measure, write_model  # noqa: E402  (a sibling script, not a package)

REPO = Path(__file__).resolve().parents[1]
DELTA_RANK = 48
SAVED = ["model.embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"]
"""What mergekit-extract-lora stores whole by default (embeddings, head, every norm)."""


def write_finetune(base: Path, out: Path) -> None:
    """The base plus, per tensor, a rank-48 update (singular values 1/(1+i)) scaled to 2% of
    the weight's norm, and a full-rank noise of 0.1%."""
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(base.glob("*.safetensors")):
        tensors = load_file(file)
        for index, (name, tensor) in enumerate(sorted(tensors.items())):
            generator = torch.Generator().manual_seed(index)
            if tensor.ndim == 2:
                out_dim, in_dim = tensor.shape
                u, _ = torch.linalg.qr(torch.randn(out_dim, DELTA_RANK, generator=generator))
                v, _ = torch.linalg.qr(torch.randn(in_dim, DELTA_RANK, generator=generator))
                values = 1 / (1 + torch.arange(DELTA_RANK, dtype=torch.float32))
                update = (u * values) @ v.T
                update *= 0.02 * tensor.norm() / update.norm()
            else:
                update = torch.zeros_like(tensor)
            noise = torch.randn(tensor.shape, generator=generator)
            tensors[name] = tensor + update + noise * (0.001 * tensor.norm() / noise.norm())
        save_file(tensors, out / file.name, metadata={"format": "pt"})
    for side in ("config.json", "model.safetensors.index.json"):
        shutil.copy(base / side, out / side)


def adapter_errors(adapter: Path, base: Path, tuned: Path) -> dict[str, float]:
    """Per LoRA module: ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F, in float64 from the written factors."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    errors = {}
    for key in sorted(k for k in factors if k.endswith("lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        weight = module + ".weight"
        with (
            safe_open(base / index[weight], "pt") as b,
            safe_open(tuned / index[weight], "pt") as t,
        ):
            delta = t.get_tensor(weight).double() - b.get_tensor(weight).double()
        up = factors[key.replace("lora_A", "lora_B")].double()
        product = (alpha / rank) * (up @ factors[key].double())
        errors[module] = float((delta - product).norm() / delta.norm())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-extract-bench"))
    parser.add_argument(
        "--mergekit", default="/work/venvs/mergekit/bin/mergekit-extract-lora", help="its path"
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each tool, alternating; the fastest counts"
    )
    args = parser.parse_args()
    work = args.work
    base, tuned = work / "base", work / "finetune"
    if not (base / "config.json").is_file():
        print("writing the base ...", flush=True)
        write_model(base, 0, None)
    if not (tuned / "config.json").is_file():
        print("writing the fine-tune ...", flush=True)
        write_finetune(base, tuned)
    saves = [word for name in SAVED for word in ("--save", name)]
    commands = {
        "mergebot": [sys.executable, "-m", "merge_engine.cli", "extract-lora", str(tuned)]
        + ["{out}", "--base", str(base), "--rank", str(args.rank), "--device", "cpu", "--quiet"]
        + saves,
        "mergekit": [args.mergekit, "--model", str(tuned), "--base-model", str(base)]
        + ["--out-path", "{out}", "--max-rank", str(args.rank), "--quiet"],
    }
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    results = {}
    for repeat in range(args.repeats):
        for tool, command in commands.items():
            out = work / f"adapter-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{tool}, run {repeat + 1} ...", flush=True)
            run = measure([word.replace("{out}", str(out)) for word in command])
            print(f"  {run['wall_s']:.1f} s", flush=True)
            if tool not in results or run["wall_s"] < results[tool]["wall_s"]:
                results[tool] = run
    for tool in commands:
        out, result = work / f"adapter-{tool}", results[tool]
        errors = adapter_errors(out, base, tuned)
        config = json.loads((out / "adapter_config.json").read_text())
        result |= {
            "modules": len(errors),
            "modules_to_save": config.get("modules_to_save"),
            "mean_error": sum(errors.values()) / len(errors),
            "max_error": max(errors.values()),
            "adapter_mb": (out / "adapter_model.safetensors").stat().st_size / 1e6,
            "errors": errors,
        }
        results[tool] = result
        print(
            f"{tool:9} {result['wall_s']:7.1f} s  peak total {result['peak_rss_gb']:.2f} GB  "
            f"peak private {result['peak_private_gb']:.2f} GB  {result['modules']} modules  "
            f"error mean {result['mean_error']:.5f} max {result['max_error']:.5f}  "
            f"adapter {result['adapter_mb']:.0f} MB",
            flush=True,
        )
    ours, theirs = results["mergebot"]["errors"], results["mergekit"]["errors"]
    if ours.keys() != theirs.keys():
        print(f"the tools factored different modules: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    else:
        gap = max(abs(ours[m] - theirs[m]) for m in ours)
        print(f"largest difference between the two tools' errors on one module: {gap:.2e}")
    mergebot, mergekit = results["mergebot"], results["mergekit"]
    print(
        f"mergekit / mergebot: time {mergekit['wall_s'] / mergebot['wall_s']:.2f}x, peak private "
        f"memory {mergekit['peak_private_gb'] / mergebot['peak_private_gb']:.2f}x, peak total "
        f"{mergekit['peak_rss_gb'] / mergebot['peak_rss_gb']:.2f}x"
    )
    params = sum(math.prod(shape) for shape in llama_shapes().values())
    results["parameters"] = params
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{params / 1e6:.0f}M parameters; results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
