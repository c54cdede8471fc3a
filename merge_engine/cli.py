"""The ``mergebot`` command: ``methods``, ``validate``, ``merge`` and ``example``.

Every engine error is printed as one sentence and exits 1; set ``MERGEBOT_DEBUG=1`` for the
traceback. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from merge_engine.errors import MergeError
from merge_engine.run import DEFAULT_SHARD_SIZE

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1GiB' or plain bytes."""
    match = SIZE.match(text)
    unit = (match[2] or "").upper().removesuffix("B") if match else None
    if not match or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; write e.g. 1GB, 500MB or 2GiB")
    return int(float(match[1]) * UNITS[unit])


def methods_table() -> list[list[str]]:
    """One row per method parameter (or per method without parameters), as printed by ``mergebot methods``."""
    from merge_engine.methods import all_methods

    rows = [
        [
            "method",
            "base",
            "random",
            "data",
            "parameter",
            "scope",
            "type",
            "default",
            "range",
            "what it does",
        ]
    ]
    for method in sorted(all_methods(), key=lambda m: m.name):
        rows.append(
            [
                method.name,
                method.base,
                "yes" if method.random else "no",
                "calibration" if method.needs_data else "no",
                "",
                "",
                "",
                "",
                "",
                method.doc,
            ]
        )
        for p in method.params:
            default = "required" if p.required else str(p.default)
            allowed = "|".join(p.choices) if p.choices else p.bounds_text()
            rows.append(["", "", "", "", p.name, p.scope, p.type.__name__, default, allowed, p.doc])
    return rows


def cmd_methods(args: argparse.Namespace) -> None:
    rows = methods_table()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for index, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
        if index == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 12)
    from merge_engine.methods import all_methods

    print(
        "\npapers: "
        + "; ".join(
            f"{m.name} {m.paper}" for m in sorted(all_methods(), key=lambda m: m.name) if m.paper
        )
    )


def cmd_validate(args: argparse.Namespace) -> None:
    from merge_engine import load_recipe, preflight

    plan = preflight(load_recipe(Path(args.recipe)), allow_pickle=args.allow_pickle)
    layers = plan.config.get("num_hidden_layers", plan.config.get("n_layer"))
    print(
        f"ok: {plan.method.name} over {len(plan.recipe.input_models())} model(s), {len(plan.tasks)} output tensors"
        + (f", {layers} layers" if layers is not None else "")
        + f", {plan.output_bytes / 1e6:.1f} MB of weights"
    )
    for ref, source in plan.sources.items():
        print(f"  {ref}: {source.revision or 'local folder'}")
    for ref, data in plan.calibration.items():
        print(f"  calibration of {ref}: {data.describe()}")
    for note in plan.notes:
        print(f"  note: {note}")


def cmd_merge(args: argparse.Namespace) -> None:
    from merge_engine import load_recipe, merge, preflight

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    recipe = load_recipe(Path(args.recipe))
    if args.dtype:
        recipe = recipe.model_copy(update={"out_dtype": args.dtype})
    plan = preflight(recipe, allow_pickle=args.allow_pickle)
    command = "mergebot merge mergebot_recipe.yaml ./merged"
    command += f" --shard-size {args.shard_size}" if args.shard_size != DEFAULT_SHARD_SIZE else ""
    command += " --allow-pickle" if args.allow_pickle else ""
    out = merge(
        plan,
        args.out_dir,
        device=args.device,
        shard_size=args.shard_size,
        show_progress=not args.quiet,
        card_command=command,
        stats_dir=args.stats_dir,
    )
    for note in plan.notes:
        print(f"note: {note}")
    print(f"merged {len(plan.tasks)} tensors into {out}")


def cmd_example(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from merge_engine import merge, preflight
    from merge_engine.example import EXAMPLE_RECIPE, make_family
    from merge_engine.recipe import recipe_from_text

    work = Path(args.work_dir)
    shutil.rmtree(
        work / "merged", ignore_errors=True
    )  # the example's own output: rerunning replaces it
    base, (a, b) = make_family(work / "models")
    recipe_text = EXAMPLE_RECIPE.format(base=base, a=a, b=b)
    (work / "recipe.yaml").write_text(recipe_text)
    print(
        f"made a tiny Llama base and two fine-tunes under {work / 'models'}; recipe: {work / 'recipe.yaml'}"
    )
    plan = preflight(recipe_from_text(recipe_text))
    out = merge(
        plan,
        work / "merged",
        device=args.device,
        show_progress=True,
        card_command=f"mergebot merge {shlex.quote(str(work / 'recipe.yaml'))} ./merged",
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(
        f"merged model in {out}: loads with transformers, logits finite: {bool(torch.isfinite(logits).all())}"
    )
    print(f"model card: {out / 'README.md'}")


def build_parser(
    extend: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """The engine's commands; ``extend`` adds more (the service adds its own this way,
    so the engine never imports the service)."""
    parser = argparse.ArgumentParser(
        prog="mergebot", description="Merge fine-tuned models with mergekit-style YAML recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the merge methods and their parameters").set_defaults(
        func=cmd_methods
    )

    validate = sub.add_parser(
        "validate",
        help="check a recipe from configs and safetensors headers, downloading no weights",
    )
    validate.add_argument("recipe")
    validate.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin with torch.load(weights_only=True)",
    )
    validate.set_defaults(func=cmd_validate)

    merge = sub.add_parser("merge", help="merge the models of a recipe into OUT_DIR")
    merge.add_argument("recipe")
    merge.add_argument("out_dir")
    merge.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")
    merge.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_SIZE,
        help="largest output shard, e.g. 1GB (default 5GB)",
    )
    merge.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="output dtype (overrides out_dtype)",
    )
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin with torch.load(weights_only=True)",
    )
    merge.add_argument(
        "--stats-dir",
        type=Path,
        help="where fisher and regmean keep the statistics of calibration runs, reused by later merges "
        "(default ~/.cache/mergebot/statistics)",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=cmd_merge)

    example = sub.add_parser("example", help="make tiny models and run a TIES merge end to end")
    example.add_argument("work_dir", nargs="?", default="mergebot-example")
    example.add_argument("--device", default="auto")
    example.set_defaults(func=cmd_example)
    if extend:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    try:
        args.func(args)
    except MergeError as error:
        if os.environ.get("MERGEBOT_DEBUG"):
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
