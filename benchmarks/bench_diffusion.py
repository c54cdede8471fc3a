"""Time, peak memory and output parity of Stable Diffusion 1.5 checkpoint merges: mergebot next
to sd-mecha (a streaming SD merger, not a project dependency), same inputs, same run.

Inputs: three single-file checkpoints A, B, C in the original LDM/A1111 layout, with every key
and shape of sd-mecha's ``sd1-ldm`` model config (UNet ``model.diffusion_model.``, VAE
``first_stage_model.``, CLIP-L ``cond_stage_model.transformer.text_model.``, position_ids
int64; no EMA copy, no scheduler buffers): 1131 tensors, 1.07 B float16 weights, 2.1 GB each.
C is random (fixed seed), A and B are C plus small noise. Written once, streamed one tensor at
a time, and cached under ``--work``.

Merges, each in its own process: weighted sum A*(1-M) + B*M with M = 0.3, and add difference
A + (B - C)*M with M = 0.5, float16 single-file output. sd-mecha runs ``weighted_sum`` /
``add_difference`` with ``sd_mecha.merge(merge_device="cpu", merge_dtype=float32,
output_dtype=float16)`` and its defaults otherwise (threads = min(max(files, 2), cores, 4),
256 MB of buffers); mergebot runs ``python -m merge_engine.cli merge recipe.yaml OUT --device
cpu --quiet`` on mergekit-style ``linear`` and ``task_arithmetic`` recipes. The parent samples
the process tree every 50 ms from /proc/PID/status: total = VmRSS (includes mapped pages of
the input files), private = RssAnon (heap: tensors, buffers; sd-mecha reads its inputs into
buffers with file reads where mergebot maps them, so its total is nearly all private). The
outputs are then compared tensor for tensor (max |diff| and float16 ulps, the ulp taken at each
element's own magnitude, so a near-zero element can be many ulps off with a tiny |diff|), and
five tensors of each output against the formula computed here in float32 and rounded to
float16. ``--dtype`` adds ``dtype:`` (mergebot's compute dtype) to both recipes.

sd-mecha lives in its own virtualenv so that mergebot's environment never imports it (system
site packages reuse the installed CPU torch; pip must not pull another torch):

    python -m venv --system-site-packages /work/bench-venv
    /work/bench-venv/bin/pip install sd-mecha==1.1.8
    python benchmarks/bench_diffusion.py --work /tmp/sdbench [--skip-mergebot | --skip-mecha]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
METHODS = {"weighted_sum": 0.3, "add_difference": 0.5}
RECIPES = {
    "weighted_sum": "merge_method: linear\nmodels:\n  - model: {A}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {B}\n    parameters: {{weight: 0.3}}\nout_dtype: float16\n",
    "add_difference": "merge_method: task_arithmetic\nbase_model: {C}\nmodels:\n"
    "  - model: {A}\n    parameters: {{weight: 1.0}}\n  - model: {B}\n    parameters: {{weight: 0.5}}\n"
    "out_dtype: float16\n",
}
LERP_RECIPE = (
    "merge_method: task_arithmetic\nbase_model: {A}\nmodels:\n"
    "  - model: {B}\n    parameters: {{weight: 0.3}}\nout_dtype: float16\n"
)
"""The weighted sum written A + (B - A)*M, the formula of sd-mecha's torch.lerp, instead of
linear's (0.7*A + 0.3*B) / 1; lerp fuses its multiply-add, so a few elements still round
differently."""
SANITY_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.11.1.proj_out.bias",
    "first_stage_model.decoder.up.3.block.2.conv2.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
]
TARGET_PRIVATE_GB = 1.5


def sd1_keys(mecha_python: str) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape) of the UNet, VAE and CLIP-L keys in sd-mecha's sd1-ldm config."""
    code = (
        "import importlib.util as u; print(u.find_spec('sd_mecha').submodule_search_locations[0])"
    )
    root = subprocess.run([mecha_python, "-c", code], capture_output=True, text=True, check=True)
    config_file = Path(root.stdout.strip()) / "extensions/builtin/model_configs/sd1-ldm.yaml"
    components = yaml.safe_load(config_file.read_text())["components"]
    return {
        name: (meta["dtype"], meta["shape"])
        for component in ("clip_l", "vae", "diffuser")
        for name, meta in components[component].items()
    }


def write_checkpoints(paths: list[Path], keys: dict[str, tuple[str, list[int]]], seed: int) -> None:
    """Stream C (random) and A, B (C plus noise) into three safetensors files in one pass."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(keys):
        dtype, shape = keys[name]
        size = math.prod(shape) * (8 if dtype == "int64" else 2)
        header[name] = {
            "dtype": "I64" if dtype == "int64" else "F16",
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = [path.with_suffix(".partial") for path in paths]
    files = [path.open("wb") for path in partial]
    generator = torch.Generator().manual_seed(seed)
    for file in files:
        file.write(struct.pack("<Q", len(raw)) + raw)
    for name in sorted(keys):
        dtype, shape = keys[name]
        if dtype == "int64":
            tensors = [torch.arange(math.prod(shape)).reshape(shape)] * 3
        else:
            base = torch.randn(shape, generator=generator) * 0.05
            tensors = [base + torch.randn(shape, generator=generator) * 0.005 for _ in range(2)]
            tensors = [t.half() for t in (*tensors, base)]
        for file, tensor in zip(files, tensors, strict=True):
            file.write(tensor.contiguous().numpy().tobytes())
    for file, src, dst in zip(files, partial, paths, strict=True):
        file.close()
        src.rename(dst)


def mecha_child(method: str, work: Path, out: Path) -> None:
    import sd_mecha

    a, b, c = (sd_mecha.model(work / f"{n}.safetensors", config="sd1-ldm") for n in "ABC")
    if method == "weighted_sum":
        recipe = sd_mecha.weighted_sum(a, b, alpha=METHODS[method])
    else:
        recipe = sd_mecha.add_difference(a, b, c, alpha=METHODS[method])
    out.mkdir(parents=True)
    sd_mecha.merge(
        recipe,
        merge_device="cpu",
        merge_dtype=torch.float32,
        output_device="cpu",
        output_dtype=torch.float16,
        output=out / "model.safetensors",
    )


def tree_memory(pid: int) -> tuple[int, int]:
    """VmRSS and RssAnon, in bytes, summed over a process and its descendants."""
    rss = anon = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{current}/status").read_text().splitlines()
            )
            rss += int(fields["VmRSS"].split()[0]) * 1024
            anon += int(fields["RssAnon"].split()[0]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            pass
    return rss, anon


def measure(command: list[str], log: Path) -> dict[str, object]:
    os.sync()  # the previous run's output is on disk before this one starts
    start = time.perf_counter()
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        peak_rss = peak_anon = 0
        while process.poll() is None:
            rss, anon = tree_memory(process.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(0.05)
    wall = time.perf_counter() - start
    if process.returncode:
        last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {process.returncode}: {last.strip()} (full log: {log})"}
    return {"wall_s": wall, "peak_total_gb": peak_rss / 1e9, "peak_private_gb": peak_anon / 1e9}


def ulps(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance in float16 units in the last place between two float16 tensors."""
    ordered = []
    for t in (x, y):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        ordered.append(torch.where(bits < 0, -(bits & 0x7FFF), bits))
    return int((ordered[0] - ordered[1]).abs().max())


def compare(left: Path, right: Path) -> dict[str, object]:
    """Stream two single-file checkpoints and compare them tensor for tensor."""
    with safe_open(left, "pt") as f, safe_open(right, "pt") as g:
        lkeys, rkeys = set(f.keys()), set(g.keys())
        r: dict[str, object] = {
            "only_left": sorted(lkeys - rkeys),
            "only_right": sorted(rkeys - lkeys),
        }
        r |= {"common": len(lkeys & rkeys), "identical": 0, "elements_differing": 0}
        r |= {"max_abs_diff": 0.0, "worst_tensor": "", "max_ulp_f16": 0, "dtype_mismatch": []}
        for name in sorted(lkeys & rkeys):
            x, y = f.get_tensor(name), g.get_tensor(name)
            if x.dtype != y.dtype:
                r["dtype_mismatch"].append(f"{name}: {x.dtype} vs {y.dtype}")
            r["identical"] += x.dtype == y.dtype and torch.equal(x, y)
            r["elements_differing"] += int((x.float() != y.float()).sum())
            diff = float((x.float() - y.float()).abs().max())
            if diff > r["max_abs_diff"]:
                r["max_abs_diff"], r["worst_tensor"] = diff, name
            if x.dtype == y.dtype == torch.float16:
                r["max_ulp_f16"] = max(r["max_ulp_f16"], ulps(x, y))
    return r


def sanity(method: str, work: Path, output: Path) -> tuple[float, int]:
    """Max abs difference and float16 ulps of SANITY_KEYS against the formula computed in
    float32 and rounded to float16."""
    m, worst_diff, worst_ulp = METHODS[method], 0.0, 0
    files = [safe_open(work / f"{n}.safetensors", "pt") for n in "ABC"]
    with safe_open(output, "pt") as out:
        for name in SANITY_KEYS:
            a, b, c = (f.get_tensor(name).float() for f in files)
            expected = (a * (1 - m) + b * m) if method == "weighted_sum" else a + (b - c) * m
            expected, got = expected.half(), out.get_tensor(name).half()
            worst_diff = max(worst_diff, float((got.float() - expected.float()).abs().max()))
            worst_ulp = max(worst_ulp, ulps(got, expected))
    return worst_diff, worst_ulp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdbench"))
    parser.add_argument("--mecha-python", default="/work/bench-venv/bin/python")
    parser.add_argument("--skip-mergebot", action="store_true")
    parser.add_argument("--skip-mecha", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        help="add `dtype:` (mergebot's compute dtype) to both recipes",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    if args.child:
        mecha_child(args.child, work, args.out)
        return

    work.mkdir(parents=True, exist_ok=True)
    inputs = {n: work / f"{n}.safetensors" for n in "ABC"}
    if not all(p.is_file() for p in inputs.values()):
        print(f"writing A, B, C under {work} ...", flush=True)
        start = time.perf_counter()
        write_checkpoints(list(inputs.values()), sd1_keys(args.mecha_python), args.seed)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)

    tools = [
        t
        for t, skip in (("sd-mecha", args.skip_mecha), ("mergebot", args.skip_mergebot))
        if not skip
    ]
    results: dict[str, dict[str, object]] = {}
    print(f"{'method':15} {'tool':9} {'wall s':>7} {'peak total GB':>14} {'peak private GB':>16}")
    for method in METHODS:
        recipe = work / f"{method}.yaml"
        text = RECIPES[method].format(**inputs)
        recipe.write_text(text + (f"dtype: {args.dtype}\n" if args.dtype else ""))
        for tool in tools:
            out = work / f"out-{tool}-{method}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            if tool == "sd-mecha":
                command = [
                    args.mecha_python,
                    __file__,
                    "--work",
                    str(work),
                    "--child",
                    method,
                    "--out",
                    str(out),
                ]
            else:
                command = [
                    sys.executable,
                    "-m",
                    "merge_engine.cli",
                    "merge",
                    str(recipe),
                    str(out),
                    "--device",
                    "cpu",
                    "--quiet",
                ]
            r = results[f"{tool} {method}"] = measure(command, work / f"{tool}-{method}.log")
            if "error" in r:
                print(f"{method:15} {tool:9} FAILED {r['error']}", flush=True)
                continue
            print(
                f"{method:15} {tool:9} {r['wall_s']:7.1f} {r['peak_total_gb']:14.2f} {r['peak_private_gb']:16.2f}",
                flush=True,
            )

    print()
    for method in METHODS:
        mecha, bot = results.get(f"sd-mecha {method}", {}), results.get(f"mergebot {method}", {})
        if "wall_s" in mecha and "wall_s" in bot:
            time_ratio = bot["wall_s"] / mecha["wall_s"]
            private_ratio = bot["peak_private_gb"] / mecha["peak_private_gb"]
            print(
                f"mergebot / sd-mecha, {method}: time {time_ratio:.2f}x (target <= 1.00: "
                f"{'met' if time_ratio <= 1 else 'MISSED'}), peak private {private_ratio:.2f}x; "
                f"mergebot peak private {bot['peak_private_gb']:.2f} GB (target < {TARGET_PRIVATE_GB}: "
                f"{'met' if bot['peak_private_gb'] < TARGET_PRIVATE_GB else 'MISSED'})"
            )
            p = compare(
                work / f"out-sd-mecha-{method}/model.safetensors",
                work / f"out-mergebot-{method}/model.safetensors",
            )
            results[f"parity {method}"] = p
            print(
                f"  parity: {p['identical']}/{p['common']} tensors bit-identical "
                f"({p['elements_differing']} elements differ), largest |diff| "
                f"{p['max_abs_diff']:.3g} ({p['worst_tensor'] or '-'}), at most {p['max_ulp_f16']} "
                f"float16 ulp; keys only in sd-mecha {len(p['only_left'])}, only in mergebot "
                f"{len(p['only_right'])}; dtype mismatches {len(p['dtype_mismatch'])} {p['dtype_mismatch'][:3]}"
            )
        for tool, r in (("sd-mecha", mecha), ("mergebot", bot)):
            if "wall_s" in r:
                diff, ulp = sanity(method, work, work / f"out-{tool}-{method}/model.safetensors")
                results[f"sanity {tool} {method}"] = {"max_abs_diff": diff, "max_ulp_f16": ulp}
                print(
                    f"  sanity, {tool} {method} vs the float32 formula, rounded, on {len(SANITY_KEYS)} tensors: "
                    f"largest |diff| {diff:.3g}, at most {ulp} float16 ulp"
                )
    if "sd-mecha weighted_sum" in results and not args.skip_mergebot:
        recipe, out = work / "weighted_sum_lerp.yaml", work / "out-mergebot-weighted_sum_lerp"
        recipe.write_text(LERP_RECIPE.format(**inputs))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = measure(
            [sys.executable, "-m", "merge_engine.cli", "merge", str(recipe), str(out), "--quiet"],
            work / "mergebot-weighted_sum_lerp.log",
        )
        if "wall_s" in r:
            p = compare(
                work / "out-sd-mecha-weighted_sum/model.safetensors", out / "model.safetensors"
            )
            results["parity weighted_sum as A + (B - A)*M"] = p
            print(
                f"weighted sum as task_arithmetic from A ({r['wall_s']:.1f} s): "
                f"{p['identical']}/{p['common']} tensors bit-identical to sd-mecha's, "
                f"{p['elements_differing']} elements differ, at most {p['max_ulp_f16']} float16 ulp"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
