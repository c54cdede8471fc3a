"""Same recipe, same tensors? Runs every method through mergebot and through mergekit (when a
``mergekit-yaml`` executable is given; mergekit is not a project dependency) on tiny Llama
models and prints the largest absolute difference per method.

    python benchmarks/mergekit_parity.py --mergekit /path/to/venv/bin/mergekit-yaml

Deterministic methods should agree to float rounding. Random methods (DARE, DELLA) draw other
random numbers than mergekit, so for them the script compares what should agree in
distribution: the fraction of entries that differ from the base.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from merge_engine import load_recipe, merge, preflight
from merge_engine.example import make_family

RECIPES = {
    "linear": "models: [{model: A, parameters: {weight: 1.0}}, {model: B, parameters: {weight: 0.5}}, {model: C, parameters: {weight: 0.25}}]",
    "slerp": "base_model: BASE\nmodels: [{model: BASE}, {model: A}]\nparameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - value: 0.5",
    "nuslerp": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0}}, {model: B, parameters: {weight: 2.0}}]",
    "multislerp": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0}}, {model: B, parameters: {weight: 0.5}}, {model: C, parameters: {weight: 0.7}}]",
    "karcher": "models: [{model: A}, {model: B}, {model: C}]",
    "task_arithmetic": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0}}, {model: B, parameters: {weight: -0.5}}]",
    "ties": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.5}}, {model: B, parameters: {weight: 0.7, density: [0.3, 0.8]}}, {model: C, parameters: {weight: 0.4, density: 0.6}}]",
    "breadcrumbs": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.6}}, {model: B, parameters: {weight: 0.5, density: 0.6}}]\nparameters: {gamma: 0.05}",
    "breadcrumbs_ties": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.6}}, {model: B, parameters: {weight: 0.5, density: 0.6}}]\nparameters: {gamma: 0.05}",
    "sce": "base_model: BASE\nmodels: [{model: A}, {model: B}, {model: C}]\nparameters: {select_topk: 0.5}",
    "ram": "base_model: BASE\nmodels: [{model: A}, {model: B}]\nparameters: {epsilon: 0.01}",
    "ramplus_tl": "base_model: BASE\nmodels: [{model: A}, {model: B}]\nparameters: {epsilon: 0.01}",
    "model_stock": "base_model: BASE\nmodels: [{model: A}, {model: B}, {model: C}]",
    "nearswap": "base_model: BASE\nmodels: [{model: BASE}, {model: A}]\nparameters: {t: 0.01}",
    "arcee_fusion": "base_model: BASE\nmodels: [{model: BASE}, {model: A}]",
    "passthrough": "slices:\n  - sources: [{model: A, layer_range: [0, 3]}]\n  - sources: [{model: B, layer_range: [1, 4]}]",
    "dare_linear": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.3}}, {model: B, parameters: {weight: 0.5, density: 0.3}}]",
    "dare_ties": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.3}}, {model: B, parameters: {weight: 0.5, density: 0.3}}]",
    "della": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.4}}, {model: B, parameters: {weight: 0.5, density: 0.4}}]\nparameters: {epsilon: 0.1}",
    "della_linear": "base_model: BASE\nmodels: [{model: A, parameters: {weight: 1.0, density: 0.4}}, {model: B, parameters: {weight: 0.5, density: 0.4}}]\nparameters: {epsilon: 0.1}",
}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def changed_fraction(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    changed = sum(int((merged[k] != base[k]).sum()) for k in base if k in merged)
    return changed / sum(v.numel() for k, v in base.items() if k in merged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path of the mergekit-yaml executable")
    parser.add_argument(
        "--hidden",
        type=int,
        default=32,
        help="hidden size (512 makes tensors large enough for the bracketed selection)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, (a, b, c) = make_family(
            work / "models",
            "llama",
            finetunes=3,
            scale=0.05,
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        names = {"BASE": base, "A": a, "B": b, "C": c}
        base_weights = weights(base)
        print(f"{'method':18} {'max |mergebot - mergekit|':>26}  note")
        for method, body in RECIPES.items():
            text = f"merge_method: {method}\n{body}\ndtype: float32\n"
            for key in ("BASE", "A", "B", "C"):
                text = text.replace(f": {key}", f": {names[key]}").replace(
                    f"model: {key}", f"model: {names[key]}"
                )
            recipe_path = work / f"{method}.yaml"
            recipe_path.write_text(text)
            ours, theirs = work / f"ours-{method}", work / f"theirs-{method}"
            merge(preflight(load_recipe(recipe_path)), ours, show_progress=False)
            run = subprocess.run(
                [args.mergekit, str(recipe_path), str(theirs), "--random-seed", "1", "--quiet"],
                capture_output=True,
                text=True,
            )
            if run.returncode:
                print(
                    f"{method:18} {'mergekit failed':>26}  {run.stderr.strip().splitlines()[-1][:100]}"
                )
                continue
            x, y = weights(ours), weights(theirs)
            if set(x) != set(y):
                print(
                    f"{method:18} {'tensor names differ':>26}  only ours: {sorted(set(x) - set(y))[:2]} only theirs: {sorted(set(y) - set(x))[:2]}"
                )
                continue
            if method in RANDOM:
                print(
                    f"{method:18} {'(random)':>26}  entries changed from base: mergebot {changed_fraction(x, base_weights):.3f}, mergekit {changed_fraction(y, base_weights):.3f}"
                )
                continue
            diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
            print(f"{method:18} {diff:26.3g}  {'identical' if diff == 0 else ''}")


if __name__ == "__main__":
    main()
