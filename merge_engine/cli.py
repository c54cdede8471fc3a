"""The ``mergebot`` command: ``methods``, ``validate``, ``merge``, ``evolve``, ``extract-lora``
and ``example``.

Every engine error is printed as one sentence and exits 1; set ``MERGEBOT_DEBUG=1`` for the
traceback. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

from merge_engine.errors import MergeError

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


WIDTH = 100  # the terminal width ``mergebot methods`` fits
GAP = "  "


def table_lines(rows: list[list[str]]) -> list[str]:
    """A header row, a rule and the rows, as left-aligned columns that fit ``WIDTH``: the last
    column takes what is left, its text wrapped over indented lines."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    indent = sum(w + len(GAP) for w in widths)
    last = max(WIDTH - indent, 20)
    rule = ["-" * w for w in widths] + ["-" * len(rows[0][-1])]
    lines = []
    for row in [rows[0], rule, *rows[1:]]:
        start = GAP.join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + GAP
        first, *more = textwrap.wrap(row[-1], last, break_on_hyphens=False) or [""]
        lines += [start + first, *(" " * indent + line for line in more)]
    return [line.rstrip() for line in lines]


def methods_overview() -> list[str]:
    """``mergebot methods``: one row per method, its whole description wrapped to fit."""
    from merge_engine.methods import all_methods

    rows = [["method", "base", "data", "what it does"]]
    rows += [
        [m.name, m.base, "calibration" if m.needs_data else "no", m.doc]
        for m in sorted(all_methods(), key=lambda m: m.name)
    ]
    return [
        *table_lines(rows),
        "",
        "mergebot methods NAME: one method in full, with its parameters and paper",
    ]


def method_details(name: str) -> list[str]:
    """``mergebot methods NAME``: the method's facts, then every parameter in full."""
    from merge_engine.methods import all_methods
    from merge_engine.methods.registry import closest_method

    methods = {m.name: m for m in all_methods()}
    if name not in methods:
        close = closest_method(name)
        hint = (
            f"did you mean '{close}'?"
            if close
            else f"the methods are {', '.join(sorted(methods))}."
        )
        raise MergeError(f"unknown merge method '{name}'; {hint}")
    method = methods[name]
    facts = [
        f"base model: {method.base}",
        f"calibration data: {'needed' if method.needs_data else 'none'}",
        f"random: {'yes, seeded by random_seed' if method.random else 'no'}",
    ]
    lines = textwrap.wrap(f"{method.name} ({method.pretty_name}): {method.doc}", WIDTH)
    lines += textwrap.wrap("; ".join(facts), WIDTH)
    lines += [f"paper: {method.paper or 'none'}", ""]
    if not method.params:
        return [*lines, "no parameters"]
    rows = [["parameter", "scope", "type", "default", "bounds", "what it does"]]
    for p in method.params:
        default = "required" if p.required else str(p.default)
        bounds = "|".join(p.choices) if p.choices else p.bounds_text()
        rows.append([p.name, p.scope, p.type.__name__, default, bounds, p.doc])
    return lines + table_lines(rows)


def cmd_methods(args: argparse.Namespace) -> None:
    print("\n".join(method_details(args.name) if args.name else methods_overview()))


def cmd_validate(args: argparse.Namespace) -> None:
    from merge_engine import load_recipe, preflight

    plan = preflight(load_recipe(Path(args.recipe)), allow_pickle=args.allow_pickle)
    if plan.recipe.output == "adapter":
        print("\n".join(plan.summary()))
        return
    layers = plan.config.get("num_hidden_layers", plan.config.get("n_layer"))
    print(
        f"ok: {plan.method.name} of {plan.describe_models()}, {len(plan.tasks)} output tensors"
        + (f", {layers} layers" if layers is not None else "")
        + f", {plan.output_bytes / 1e6:.1f} MB of weights"
    )
    for ref, source in plan.sources.items():
        print(f"  {ref.base}: {source.revision or ref.base.local_kind()}")
        if source.adapter is not None:
            adapter = source.adapter
            pin = adapter.revision or adapter.ref.local_kind()
            print(f"    + adapter {adapter.ref}: {pin} ({adapter.describe()})")
    for ref, data in plan.calibration.items():
        print(f"  calibration of {ref}: {data.describe()}")
    for note in plan.notes:
        print(f"  note: {note}")


def cmd_merge(args: argparse.Namespace) -> None:
    from merge_engine import load_recipe, merge, preflight
    from merge_engine.run.executor import DEFAULT_SHARD_SIZE

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    recipe = load_recipe(Path(args.recipe))
    if args.dtype:
        recipe = recipe.model_copy(update={"out_dtype": args.dtype})
    plan = preflight(recipe, allow_pickle=args.allow_pickle)
    if recipe.output == "adapter":  # LoRA adapters combined into one (plan.adapter_plan)
        out = merge(plan, args.out_dir, show_progress=not args.quiet)
        print("\n".join(plan.summary()[1:]))
        print(f"combined {len(plan.adapters)} adapters into {out}")
        return
    command = "mergebot merge mergebot_recipe.yaml ./merged"
    shard_size = DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size
    command += f" --shard-size {shard_size}" if shard_size != DEFAULT_SHARD_SIZE else ""
    command += " --allow-pickle" if args.allow_pickle else ""
    out = merge(
        plan,
        args.out_dir,
        device=args.device,
        shard_size=shard_size,
        show_progress=not args.quiet,
        card_command=command,
        stats_dir=args.stats_dir,
    )
    for note in plan.notes:
        print(f"note: {note}")
    print(f"merged {len(plan.tasks)} tensors into {out}")


def cmd_extract_lora(args: argparse.Namespace) -> None:
    import torch

    from merge_engine.extract import extract_lora, plan_extraction

    if args.rank is None and args.energy is None:
        raise MergeError("give --rank R, --energy F or both (the rank then caps the threshold)")
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if _extract_sd_lora(args):
        return
    plan = plan_extraction(
        args.finetune,
        args.base,
        rank=args.rank,
        energy=args.energy,
        save=args.save,
        lora_embeddings=args.lora_embeddings,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    result = extract_lora(plan, args.out_dir, device=args.device, show_progress=not args.quiet)
    errors = [m.relative_error for m in result.modules]
    ranks = sorted({m.rank for m in result.modules})
    print(
        f"extracted {len(result.modules)} modules at rank "
        f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]} to {ranks[-1]}'} into {result.out}: "
        f"relative error mean {sum(errors) / len(errors):.4g}, largest {max(errors):.4g}"
    )
    if result.differing:
        name, difference = result.differing[0]
        print(
            f"note: {len(result.differing)} tensor(s) outside the adapter differ from the base "
            f"(the most: {name}, relative difference {difference:.3g}); the card lists them, "
            "and --save MODULE stores a module whole"
        )


def _extract_sd_lora(args: argparse.Namespace) -> bool:
    """``extract-lora`` for a Stable Diffusion fine-tune: a kohya-format LoRA file; False when
    the fine-tune is no diffusion checkpoint (a PEFT adapter is extracted instead)."""
    import torch

    from merge_engine.extract.sd_lora import extract_sd_lora, plan_sd_extraction
    from merge_engine.recipe.schema import ModelReference
    from merge_engine.sources.inspection import inspect_model

    finetune = inspect_model(ModelReference.parse(args.finetune))
    if not finetune.layout.is_diffusion:
        return False
    if args.rank is None or args.energy is not None or args.save or args.lora_embeddings:
        raise MergeError(
            f"{args.finetune} is {finetune.layout}, whose LoRA is extracted at one rank; give "
            "--rank R alone (--energy, --save and --lora-embeddings are for language models)"
        )
    base = inspect_model(ModelReference.parse(args.base))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    plan = plan_sd_extraction(finetune, base, args.rank, conv=args.conv, dtype=dtype)
    result = extract_sd_lora(plan, args.out_dir)
    errors = [m.relative_error for m in result.modules]
    print(
        f"extracted {len(result.modules)} modules at rank {args.rank} into {result.out}: "
        f"relative error mean {sum(errors) / len(errors):.4g}, largest {max(errors):.4g}"
    )
    return True


class _Interrupt:
    """Ctrl-C for a search that cannot lose it. Python raises KeyboardInterrupt wherever the
    interpreter is when the signal is handled, and drops it when that is a garbage
    collector's callback (SQLAlchemy's run often, between the study's queries): the search
    then ran to its budget. The handler raises as usual and also remembers, and the search's
    stop check (between trials, and every half second within one) raises it again."""

    def __init__(self) -> None:
        self.seen = False

    def __enter__(self) -> _Interrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def stop(self) -> bool:
        if self.seen:
            raise KeyboardInterrupt
        return False


def cmd_evolve(args: argparse.Namespace) -> None:
    from merge_engine.evolve.report import fitness_text, wall_time_text
    from merge_engine.evolve.search import evolve
    from merge_engine.evolve.spec import load_spec

    spec = load_spec(Path(args.spec))
    try:
        with _Interrupt() as interrupt:
            result = evolve(
                spec,
                args.out_dir,
                resume=args.resume,
                storage=args.storage,
                workers=args.workers,
                device=args.device,
                show_progress=not args.quiet,
                join=args.join,
                stop=interrupt.stop,
            )
    except KeyboardInterrupt:
        from merge_engine.evolve.study import without_password

        again = ["mergebot", "evolve", args.spec, args.out_dir, "--resume"]
        again += ["--workers", str(args.workers)] if args.workers != 1 else []
        again += ["--device", args.device] if args.device != "auto" else []
        again += ["--storage", without_password(args.storage)] if args.storage else []
        print(
            f"stopped; the finished trials are kept: continue with {shlex.join(again)}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    if result is None:
        return
    print(
        f"best of {len(result.records)} trials: search fitness "
        f"{fitness_text(result.search_fitness)}, held-out {fitness_text(result.held_out_fitness)}; "
        f"{wall_time_text(result.wall_seconds)}"
    )
    for baseline in result.baselines:
        print(
            f"  {baseline.label}: search {fitness_text(baseline.search)}, "
            f"held-out {fitness_text(baseline.held_out)}"
        )
    print(f"wrote the winner into {result.out} (recipe: {result.out / 'mergebot_recipe.yaml'})")


def cmd_example(args: argparse.Namespace) -> None:
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from merge_engine import merge, preflight
    from merge_engine.example import (
        EXAMPLE_RECIPE,
        EXAMPLE_SEARCH,
        EXAMPLE_TEXTS,
        make_family,
        save_tiny_tokenizer,
    )
    from merge_engine.recipe.schema import recipe_from_text

    work = Path(args.work_dir)
    spec, searched = work / "search.yaml", work / "searched"
    for output in (work / "merged", searched):  # the example's own outputs: rerunning replaces them
        shutil.rmtree(output, ignore_errors=True)
    base, (a, b) = make_family(work / "models")
    for folder in (base, a, b):  # a search scores text, which it tokenizes
        save_tiny_tokenizer(folder)
    recipe_text = EXAMPLE_RECIPE.format(base=base, a=a, b=b)
    (work / "recipe.yaml").write_text(recipe_text)
    examples = json.dumps(list(EXAMPLE_TEXTS))
    spec.write_text(
        EXAMPLE_SEARCH.format(spec=spec, out=searched, base=base, a=a, b=b, examples=examples)
    )
    print(
        f"made a tiny Llama base and two fine-tunes under {work / 'models'}; "
        f"recipe: {work / 'recipe.yaml'}; search spec: {spec}"
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
    print(
        f"next, a tiny search: mergebot evolve {shlex.quote(str(spec))} {shlex.quote(str(searched))}"
    )


def build_parser(
    extend: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """The engine's commands; ``extend`` adds more (the service adds its own this way,
    so the engine never imports the service)."""
    parser = argparse.ArgumentParser(
        prog="mergebot", description="Merge fine-tuned models with mergekit-style YAML recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser(
        "methods", help="list the merge methods, or show one method's parameters"
    )
    methods.add_argument(
        "name", nargs="?", help="a method: its parameters, defaults, bounds, paper"
    )
    methods.set_defaults(func=cmd_methods)

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

    evolve = sub.add_parser(
        "evolve",
        help="search merge parameters and/or a layer path against a task metric; write the winner",
    )
    evolve.add_argument("spec", help="the search spec (YAML)")
    evolve.add_argument(
        "out_dir", help="the winning model; the search itself goes in OUT_DIR/evolve"
    )
    evolve.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped search in OUT_DIR from its finished trials",
    )
    evolve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes evaluating trials on this machine (each its own GPU)",
    )
    evolve.add_argument(
        "--storage",
        help="the study database, shared by every process of the search (default: sqlite in OUT_DIR/evolve), "
        "e.g. postgresql://user@host/db",
    )
    evolve.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu or cuda"
    )
    evolve.add_argument("--quiet", action="store_true", help="no progress bar")
    evolve.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    evolve.set_defaults(func=cmd_evolve)

    extract = sub.add_parser(
        "extract-lora",
        help="extract a LoRA from a fine-tune and its base (truncated SVD): a PEFT adapter, or a "
        "kohya-format LoRA file for an SD1.5/SDXL checkpoint",
        description="Factor the difference between a fine-tune and its base, module by module, "
        "into a PEFT LoRA adapter in OUT_DIR (adapter_config.json, adapter_model.safetensors, a "
        "card with each module's reconstruction error). By default every linear layer inside the "
        "transformer layers; models are local folders or Hub references (org/name@revision), "
        "read one tensor at a time. An SD1.5/SDXL fine-tune (diffusers folder or single file) "
        "gives a kohya-format LoRA, OUT_DIR/pytorch_lora_weights.safetensors, at --rank.",
    )
    extract.add_argument("finetune", metavar="FINETUNE", help="the fine-tuned model")
    extract.add_argument("out_dir", metavar="OUT_DIR", help="the adapter folder (new or empty)")
    extract.add_argument(
        "--base", required=True, help="the base model the fine-tune was trained from"
    )
    extract.add_argument("--rank", type=int, help="the rank of every module's factors")
    extract.add_argument(
        "--energy",
        type=float,
        help="per module, the smallest rank keeping this fraction of the squared singular values "
        "(e.g. 0.9); with --rank, that rank caps it",
    )
    extract.add_argument(
        "--save",
        action="append",
        default=[],
        metavar="MODULE",
        help="store this module whole (modules_to_save), e.g. lm_head; repeatable",
    )
    extract.add_argument(
        "--lora-embeddings",
        action="store_true",
        help="factor the input embedding and the output head too (default: left out)",
    )
    extract.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="the factors' dtype (default: the fine-tune's)",
    )
    extract.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu or cuda"
    )
    extract.add_argument(
        "--conv",
        action="store_true",
        help="SD checkpoints: factor the UNet's convolutions too (LoCon), not only its attention",
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(func=cmd_extract_lora)

    example_help = "make tiny models, a recipe and a search spec, and run a TIES merge end to end"
    example = sub.add_parser(
        "example",
        help=example_help,
        description=f"{example_help[0].upper()}{example_help[1:]}: WORK_DIR/models gets a tiny "
        "Llama base and two fine-tunes (with a tokenizer), WORK_DIR/recipe.yaml a TIES recipe over "
        "them, merged into WORK_DIR/merged, and WORK_DIR/search.yaml a tiny search spec for "
        "`mergebot evolve`. Running it again replaces them.",
    )
    example.add_argument(
        "work_dir",
        nargs="?",
        metavar="WORK_DIR",
        default="mergebot-example",
        help="the folder the models, recipe, search spec and merge go in (default: %(default)s)",
    )
    example.add_argument(
        "--device", default="auto", help="auto (GPU when there is one), cpu or cuda"
    )
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
