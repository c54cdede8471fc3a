"""An adapter output (``output: adapter``) against PEFT's own ``add_weighted_adapter`` on the
same two saved rank-64 adapters of a ~135M-parameter Llama-style model: wall time, peak
memory, and whether the factors are equal, per combination type, in the same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_adapter_combination.py [--work /tmp/mergebot-adapter-bench] \\
        [--types cat,ties,svd,dare_linear]

The base is float32 (hidden 1024, intermediate 2816, 8 layers, vocab 16000); each adapter
targets every linear layer of the transformer layers at rank 64 with random non-zero B's.
Each side runs in its own process with one torch thread, on the CPU: mergebot reads the
base's config and header only and streams the adapters module by module; PEFT loads the base
and both adapters, combines, and saves the combined adapter. Memory is the process's peak
resident set (``VmHWM``, which ``ru_maxrss`` would carry over from the parent across
``exec``); it includes the pages of memory-mapped files it read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=16000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [0.7, 0.5]
SEED = 0


def arguments(kind: str) -> dict:
    kwargs: dict = {}
    if kind not in ("svd", "linear", "cat"):
        kwargs["density"] = 0.5
    return kwargs


def prepare(work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if (work / "b" / "adapter_model.safetensors").exists():
        return
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG))
    base.save_pretrained(work / "base")
    for index, name in enumerate(("a", "b")):
        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=128, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(index + 1)
        for key, parameter in model.named_parameters():
            if "lora_" in key:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
        model.save_pretrained(work / name)
        base = model.unload()


def run_mergebot(work: Path, kind: str) -> None:
    from merge_engine import merge, preflight
    from merge_engine.recipe.schema import recipe_from_text

    models = "\n".join(
        f"  - model: {work / name}\n    parameters: {{weight: {w}}}"
        for name, w in zip(("a", "b"), WEIGHTS, strict=True)
    )
    text = (
        f"output: adapter\nmerge_method: {kind}\nbase_model: {work / 'base'}\n"
        f"random_seed: {SEED}\nmodels:\n{models}\n"
        + (f"parameters: {json.dumps(arguments(kind))}\n" if arguments(kind) else "")
    )
    merge(preflight(recipe_from_text(text)), work / f"mergebot-{kind}", show_progress=False)


def run_peft(work: Path, kind: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(work / "base"), work / "a", "a"
    )
    model.load_adapter(work / "b", "b")
    torch.manual_seed(SEED)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "combined", kind, **arguments(kind))
    model.save_pretrained(work / f"peft-{kind}", selected_adapters=["combined"])


def child(side: str, work: Path, kind: str) -> None:
    start = time.perf_counter()
    (run_mergebot if side == "mergebot" else run_peft)(work, kind)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def equal(work: Path, kind: str) -> bool:
    import torch
    from safetensors.torch import load_file

    ours = load_file(work / f"mergebot-{kind}" / "adapter_model.safetensors")
    theirs = load_file(work / f"peft-{kind}" / "combined" / "adapter_model.safetensors")
    theirs = {k: v for k, v in theirs.items() if ".lora_" in k}
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebot-adapter-bench"))
    parser.add_argument("--types", default="cat,ties,svd,dare_linear")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "TYPE"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.work, args.child[1])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print("| type | mergebot s | mergebot peak MB | PEFT s | PEFT peak MB | equal |")
    print("|---|---|---|---|---|---|")
    for kind in args.types.split(","):
        results = {}
        for side in ("mergebot", "peft"):
            for folder in args.work.glob(f"{side}-{kind}"):
                subprocess.run(["rm", "-rf", str(folder)], check=True)
            done = subprocess.run(
                [sys.executable, __file__, "--work", str(args.work), "--child", side, kind],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        m, p = results["mergebot"], results["peft"]
        print(
            f"| {kind} | {m['seconds']:.1f} | {m['peak_mb']:.0f} | {p['seconds']:.1f} | "
            f"{p['peak_mb']:.0f} | {equal(args.work, kind)} |"
        )


if __name__ == "__main__":
    main()
