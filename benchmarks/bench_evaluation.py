"""A trial's evaluation against its floor: transformers' own greedy ``generate`` with the
attention cache, on the same examples, model and batches, in one run.

    python benchmarks/bench_evaluation.py [--examples 200] [--threads 1] [--device cpu]

Two random Llamas of the issue's size (~664k parameters: hidden 128, 4 layers, the tiny
character tokenizer) and ``--examples`` exact-match prompts such as ``"copy 4821="`` of 8 to
14 tokens, answers of at most 6 (``max_new_tokens: 6``). Each figure is the best of
``--repeats`` runs after a warm-up, on ``--threads`` torch threads:

1. exact match on a parameter-space candidate (an ordinary transformers model):
   ``evaluate_task`` at the default batch size, against ``generate`` over the same batches
   (prompts grouped by length, so nothing is padded), and the loop that ran before the cache
   (tests/old_evaluation.py) at the old default batch of 8 and at the new default;
2. exact match on a layer path of 8 slots over both models, every layer used twice, against
   ``generate`` of the same path written as a plain model (the folded recipe, merged);
3. multiple choice (4 choices per prompt) and nll, against the loops before the cache at
   their old default batch of 8 (no floor of transformers' own here).

The goal of (1) and (2): the ratio to ``generate`` at most 1.2.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from old_evaluation import old_greedy, old_logprobs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from merge_engine import merge  # noqa: E402
from merge_engine.evolve.candidates import LayerCandidate, folded_recipe, load_source  # noqa: E402
from merge_engine.evolve.decoding import default_batch_size  # noqa: E402
from merge_engine.evolve.fitness import evaluate_task  # noqa: E402
from merge_engine.evolve.genome import LayerRef  # noqa: E402
from merge_engine.evolve.spec import FitnessTask  # noqa: E402
from merge_engine.evolve.task_rows import TaskRows  # noqa: E402
from merge_engine.example import save_model, save_tiny_tokenizer, tiny_config  # noqa: E402
from merge_engine.recipe.schema import ModelReference  # noqa: E402

SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
MAX_NEW_TOKENS = 6
OLD_BATCH = 8


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """The fastest of ``repeats`` timed runs, after one untimed (warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def rows(kind: str, examples: list, **options) -> TaskRows:
    task = FitnessTask.model_validate({"kind": kind, "data": {"examples": examples}, **options})
    return TaskRows(task, kind, "fitness[0]", list(task.data.examples), [])


def prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 9)))
        task = rng.choice(("copy", "reverse"))
        out.append({"prompt": f"{task} {digits}=", "answer": digits})
    return out


def floor(
    model, tokenizer, examples: list[dict], batch: int, device, new_tokens: int = MAX_NEW_TOKENS
) -> None:
    """transformers' greedy generate with the cache over prompts grouped by length."""
    groups: dict[int, list[list[int]]] = {}
    for row in examples:
        ids = tokenizer(row["prompt"])["input_ids"]
        groups.setdefault(len(ids), []).append(ids)
    with torch.no_grad():
        for group in groups.values():
            for start in range(0, len(group), batch):
                ids = torch.tensor(group[start : start + batch], device=device)
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )


def old_exact_match(model, tokenizer, examples: list[dict], batch: int) -> None:
    ids = [tokenizer(row["prompt"])["input_ids"] for row in examples]
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            old_greedy(
                model,
                ids[start : start + batch],
                MAX_NEW_TOKENS,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )


def old_sequences(model, sequences: list[list[int]], pad: int) -> None:
    with torch.no_grad():
        for start in range(0, len(sequences), OLD_BATCH):
            old_logprobs(model, sequences[start : start + OLD_BATCH], pad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="mergebot-bench-evaluation-"))
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", **SHAPE))
        folders.append(save_tiny_tokenizer(save_model(model, work / f"model{seed}")))
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    refs = [ModelReference.parse(str(f)) for f in folders]
    sources = [load_source(ref, device) for ref in refs]
    plain = sources[0].module
    params = sum(p.numel() for p in plain.parameters())
    examples = prompts(args.examples, seed=0)
    match = rows("exact_match", examples, max_new_tokens=MAX_NEW_TOKENS)
    longest = max(len(tokenizer(row["prompt"])["input_ids"]) for row in examples)
    batch = default_batch_size(plain, device, longest + MAX_NEW_TOKENS, 1)  # as exact match's
    print(
        f"{args.examples} exact-match examples, max_new_tokens {MAX_NEW_TOKENS}, {params:,}-parameter "
        f"Llamas, {args.threads} thread(s), {device}; default batch size {batch}; best of {args.repeats}"
    )

    ours = best_of(args.repeats, lambda: run_task(plain, tokenizer, match, device))
    generate = best_of(args.repeats, lambda: floor(plain, tokenizer, examples, batch, device))
    old_8 = best_of(1, lambda: old_exact_match(plain, tokenizer, examples, OLD_BATCH))
    old_new = best_of(1, lambda: old_exact_match(plain, tokenizer, examples, batch))
    print("\nexact match, parameter-space candidate")
    print(f"  evaluate_task (cache)      {ours:8.3f} s   {ours / generate:5.2f}x generate")
    print(f"  transformers generate      {generate:8.3f} s")
    print(f"  old loop, batch {OLD_BATCH:<3}        {old_8:8.3f} s   {old_8 / ours:5.1f}x ours")
    print(f"  old loop, batch {batch:<3}        {old_new:8.3f} s   {old_new / ours:5.1f}x ours")

    path = [(LayerRef(m, layer), 1.0) for m in (0, 1) for layer in (0, 1)]
    path = [*path, *path]  # every layer twice
    layered = LayerCandidate(sources).build(path)
    merge(folded_recipe(path, refs), work / "path")
    written = AutoModelForCausalLM.from_pretrained(work / "path").to(device).eval()
    ours_path = best_of(args.repeats, lambda: run_task(layered, tokenizer, match, device))
    generate_path = best_of(
        args.repeats, lambda: floor(written, tokenizer, examples, batch, device)
    )
    old_path = best_of(1, lambda: old_exact_match(layered, tokenizer, examples, OLD_BATCH))
    print(f"\nexact match, layer path of {len(path)} slots (each layer twice)")
    print(
        f"  evaluate_task (cache)      {ours_path:8.3f} s   {ours_path / generate_path:5.2f}x generate of the written model"
    )
    print(f"  generate, written model    {generate_path:8.3f} s")
    print(
        f"  old loop, batch {OLD_BATCH:<3}        {old_path:8.3f} s   {old_path / ours_path:5.1f}x ours"
    )

    choices = [
        {**row, "choices": [row["answer"], row["answer"][::-1], "0", "12"], "answer": 0}
        for row in examples
    ]
    choice_rows = rows("multiple_choice", choices)
    ours_mc = best_of(args.repeats, lambda: run_task(plain, tokenizer, choice_rows, device))
    pairs = [
        tokenizer(row["prompt"])["input_ids"] + tokenizer(c, add_special_tokens=False)["input_ids"]
        for row in choices
        for c in row["choices"]
    ]
    old_mc = best_of(1, lambda: old_sequences(plain, pairs, tokenizer.pad_token_id))
    texts = [{"text": f"{row['prompt']}{row['answer']} and some more text"} for row in examples]
    nll_rows = rows("nll", texts)
    ours_nll = best_of(args.repeats, lambda: run_task(plain, tokenizer, nll_rows, device))
    text_ids = [tokenizer(row["text"])["input_ids"] for row in texts]
    old_nll = best_of(1, lambda: old_sequences(plain, text_ids, tokenizer.pad_token_id))
    print("\nmultiple choice (4 choices) and nll, parameter-space candidate")
    print(
        f"  multiple choice            {ours_mc:8.3f} s   old loop (batch {OLD_BATCH}) {old_mc:.3f} s, {old_mc / ours_mc:.1f}x"
    )
    print(
        f"  nll                        {ours_nll:8.3f} s   old loop (batch {OLD_BATCH}) {old_nll:.3f} s, {old_nll / ours_nll:.1f}x"
    )


def run_task(model, tokenizer, task_rows: TaskRows, device) -> None:
    with torch.no_grad():
        evaluate_task(model, tokenizer, task_rows, "search", device)


if __name__ == "__main__":
    main()
