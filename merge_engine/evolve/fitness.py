"""The built-in evaluators: a task's examples in, one number per task out, higher is better.

Reading (:func:`read_tasks`) happens once, before the search: each split's data is pinned,
fetched and read the way calibration data is (:mod:`merge_engine.data.calibration`), every field
the task reads is checked in every example, and the search data is split when the task gives
no held-out data. Evaluating (:func:`evaluate`) scores one candidate on one split of every task.

The model is a transformers model (a parameter-space candidate, or the container of a layer
path, whose slots each have their own cache entry): called as ``model(input_ids=...,
attention_mask=..., cache=..., use_cache=..., logits_to_keep=...)``, it returns ``.logits`` and
``.cache``. Greedy decoding and choice scoring are written out here, over the attention cache,
to be at transformers' own ``generate`` speed on either. Prompts that run together have one
length, so nothing is padded; what runs after a cached prompt (choices) and whole texts (nll)
are right-padded, so padding never changes the logits of real positions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from merge_engine.data import calibration
from merge_engine.errors import RecipeError, excerpt
from merge_engine.evolve.spec import MAX_BATCH_SIZE, FitnessTask, TaskData
from merge_engine.evolve.stopping import StopCheckFunction, never_stop

SPLITS = ("search", "held_out")
METRICS = {
    "multiple_choice": "accuracy",
    "exact_match": "exact_match",
    "nll": "nll",
    "classification": "accuracy",
}

Row = dict[str, Any]

CPU_BATCH_MEMORY = 8 << 20
"""Bytes of logits and cache a batch may take on a CPU at least (:func:`default_batch_size`)."""


@dataclass
class TaskRows:
    """A task's examples, read and checked: a multiple-choice answer given as the text of a
    choice is stored as its index, an exact-match answer given as a number as text."""

    task: FitnessTask
    name: str  # task.name or task.kind
    where: str  # "fitness[i]", the spec field, for error messages
    search: list[Row]
    held_out: list[Row]


@dataclass(frozen=True)
class Score:
    task: str
    metric: str  # "accuracy" | "exact_match" | "nll"
    value: float  # the metric as people read it (nll: mean nats per token)
    fitness: float  # higher is better: accuracy, exact match, -nll


@dataclass(frozen=True)
class Fitness:
    total: float  # sum(weight_i * fitness_i) / sum(weight_i)
    scores: tuple[Score, ...]


# Reading


def read_tasks(
    tasks: list[FitnessTask],
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> list[TaskRows]:
    """Every task's examples, read and checked; task i is named ``fitness[i]`` in errors."""
    return [
        read_task(task, f"fitness[{i}]", token, hub_only, cache_dir) for i, task in enumerate(tasks)
    ]


def read_task(
    task: FitnessTask,
    where: str,
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> TaskRows:
    """One task's search and held-out examples (``held_out_fraction`` of ``data`` drawn with
    the data's seed when the task gives no ``held_out``)."""
    if task.kind == "lm_eval":
        from merge_engine.evolve import lm_eval_tasks  # the optional extra, only when asked for

        return lm_eval_tasks.read_task(task, where, hub_only)
    search = _read_split(task, task.data, where, "data", token, hub_only, cache_dir)
    if task.held_out is not None:
        held_out = _read_split(task, task.held_out, where, "held_out", token, hub_only, cache_dir)
    else:
        search, held_out = _split(search, task.held_out_fraction, task.data.seed, where)
    return TaskRows(task, task.name or task.kind, where, search, held_out)


def _read_split(
    task: FitnessTask,
    data: TaskData,
    where: str,
    split: str,
    token: str | bool | None,
    hub_only: bool,
    cache_dir: Path | None,
) -> list[Row]:
    """All the block's rows are read and checked, so that an error's example number is the
    one in the data, then ``samples`` of them are drawn as calibration data is drawn."""
    block = f"{where}.{split}"
    source = calibration.resolve(data.as_calibration(task.fields()[0][1]), block, token, hub_only)
    calibration.fetch(source, token, cache_dir)
    found = calibration.read_rows(source)
    if not found:
        raise RecipeError(
            f"the data of {block} is empty; give it at least one example", field=block
        )
    return calibration.draw(_check_rows(found, task, where, block), data.samples, data.seed)


def _check_rows(found: list[Row], task: FitnessTask, where: str, block: str) -> list[Row]:
    """Copies of the rows (inline examples are the spec's own dicts), checked and normalised."""
    checked = []
    for number, row in enumerate(found, start=1):
        example = f"example {number} of {block}"
        for option, name in task.fields():
            if name not in row:
                has = ", ".join(sorted(map(str, row))) or "no fields"
                raise RecipeError(
                    f"{example} has no field '{name}' (it has {has}); set {option} to the right field",
                    field=f"{where}.{option}",
                )
        checked.append(_CHECKS[task.kind](dict(row), task, example, where))
    return checked


def _check_text(row: Row, task: FitnessTask, option: str, example: str, where: str) -> None:
    value = row[getattr(task, option)]
    if not isinstance(value, str) or not value:
        raise RecipeError(
            f"{example} has {getattr(task, option)} {excerpt(value)}, not a text; write it as a non-empty string",
            field=f"{where}.{option}",
        )


def _check_multiple_choice(row: Row, task: FitnessTask, example: str, where: str) -> Row:
    _check_text(row, task, "prompt_field", example, where)
    choices = row[task.choices_field]
    if not (
        isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) and c for c in choices)
    ):
        raise RecipeError(
            f"{example} has choices {excerpt(choices)}, not a list of at least 2 non-empty strings; write the options as a list of texts",
            field=f"{where}.choices_field",
        )
    answer = row[task.answer_field]
    is_index = isinstance(answer, int) and not isinstance(answer, bool)
    if isinstance(answer, str) and answer in choices:
        row[task.answer_field] = choices.index(answer)
    elif not (is_index and 0 <= answer < len(choices)):
        raise RecipeError(
            f"{example} has answer {excerpt(answer)}, neither an index of its {len(choices)} choices (from 0) nor one of them; write the right choice's index or text",
            field=f"{where}.answer_field",
        )
    return row


def _check_exact_match(row: Row, task: FitnessTask, example: str, where: str) -> Row:
    _check_text(row, task, "prompt_field", example, where)
    answer = row[task.answer_field]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        row[task.answer_field] = str(answer)
    elif not isinstance(answer, str):
        raise RecipeError(
            f"{example} has answer {excerpt(answer)}, not a text or a number; write the expected output as a string",
            field=f"{where}.answer_field",
        )
    return row


def _check_nll(row: Row, task: FitnessTask, example: str, where: str) -> Row:
    _check_text(row, task, "text_field", example, where)
    return row


def _check_classification(row: Row, task: FitnessTask, example: str, where: str) -> Row:
    _check_text(row, task, "text_field", example, where)
    label = row[task.label_field]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        raise RecipeError(
            f"{example} has label {excerpt(label)}, not a class id or name; write an integer class id or one of the model's label names",
            field=f"{where}.label_field",
        )
    return row


_CHECKS: dict[str, Callable[[Row, FitnessTask, str, str], Row]] = {
    "multiple_choice": _check_multiple_choice,
    "exact_match": _check_exact_match,
    "nll": _check_nll,
    "classification": _check_classification,
}


def _split(found: list, fraction: float, seed: int, where: str) -> tuple[list, list]:
    """(search, held-out): a shuffle seeded with ``seed`` holds out ``fraction`` of the rows,
    at least one on each side; each side keeps the data's order."""
    if len(found) < 2:
        raise RecipeError(
            f"{where}.data has {len(found)} example, too few to keep some for the held-out score; add examples or give held_out",
            field=f"{where}.data",
        )
    order = list(range(len(found)))
    random.Random(seed).shuffle(order)
    count = min(max(round(len(found) * fraction), 1), len(found) - 1)
    held = set(order[:count])
    search = [row for i, row in enumerate(found) if i not in held]
    return search, [row for i, row in enumerate(found) if i in held]


# Evaluating


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[TaskRows],
    split: str,
    device: torch.device,
    check: StopCheckFunction = never_stop,
) -> Fitness:
    """Every task's score on ``split`` and their weighted mean; ``check()`` is called before
    every forward pass, and may raise to abandon the evaluation."""
    scores = tuple(evaluate_task(model, tokenizer, rows, split, device, check) for rows in tasks)
    weights = [rows.task.weight for rows in tasks]
    total = sum(w * s.fitness for w, s in zip(weights, scores, strict=True)) / sum(weights)
    return Fitness(total, scores)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: TaskRows,
    split: str,
    device: torch.device,
    check: StopCheckFunction = never_stop,
) -> Score:
    """One task's score on ``split`` ("search" or "held_out"); the model is already on
    ``device``, and is left in the training mode it was in."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    examples = rows.search if split == "search" else rows.held_out
    with torch.no_grad(), _evaluating(model):
        if rows.task.kind == "lm_eval":
            from merge_engine.evolve import lm_eval_tasks

            return lm_eval_tasks.evaluate_task(model, tokenizer, rows, split, device, check)
        value = _EVALUATORS[rows.task.kind](model, tokenizer, rows, examples, device, check)
    metric = METRICS[rows.task.kind]
    return Score(rows.name, metric, value, -value if metric == "nll" else value)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: TaskRows,
    examples: list[Row],
    device: Any,
    check: StopCheckFunction,
) -> float:
    """Accuracy; a choice's score is the sum of its tokens' log-probabilities after the
    prompt (:func:`choice_scores`). Too long a pair loses the start of the prompt, never the
    choice."""
    task = rows.task
    pairs = []  # (prompt ids, choice ids) per choice of every example, in order
    for row in examples:
        prompt = _ids(tokenizer, row[task.prompt_field], True, rows, "prompt_field")
        for choice in row[task.choices_field]:
            ids = _ids(tokenizer, choice, False, rows, "choices_field")[: task.max_length - 1]
            pairs.append((prompt[-(task.max_length - len(ids)) :], ids))
    longest = max(len(prompt) + len(choice) for prompt, choice in pairs)
    scored = max(len(ids) for _, ids in pairs)
    batch_size = batch_size_of(task, model, device, longest, scored)
    flat = iter(choice_scores(model, pairs, pad_id(tokenizer), batch_size, device, check))
    correct = 0
    for row in examples:
        scores = [next(flat).logprob for _ in row[task.choices_field]]
        correct += max(range(len(scores)), key=scores.__getitem__) == row[task.answer_field]
    return correct / len(examples)


class ContinuationScore(NamedTuple):
    """A continuation after its prompt: its tokens' summed log-probability, and whether
    greedy decoding would give every one of them."""

    logprob: float
    greedy: bool


def choice_scores(
    model: torch.nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    pad: int,
    batch_size: int,
    device: Any,
    check: StopCheckFunction = never_stop,
) -> list[ContinuationScore]:
    """Per (prompt, continuation) pair (a prompt of one token at least, a continuation of
    any length), how likely the continuation is after the prompt.

    Pairs with the same prompt share one forward over it: the prompts of a batch (all of one
    length, so nothing is padded) run once with the cache kept, the first continuation token
    is read from the prompt's last position, then every continuation runs once on a copy of
    its prompt's cache (right-padded, the padding after every real token). A batch holds at
    most ``batch_size`` continuations, and at least one prompt's."""
    prompts: dict[tuple[int, ...], list[int]] = {}  # prompt -> indices of its pairs
    scores = [ContinuationScore(0.0, True)] * len(pairs)  # an empty continuation's
    for index, (prompt, continuation) in enumerate(pairs):
        if continuation:
            prompts.setdefault(tuple(prompt), []).append(index)
    for batch in _prompt_batches(prompts, batch_size):
        check()
        ids = torch.tensor([list(prompt) for prompt in batch], device=device)
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (P, V)
        members = [(p, i) for p, prompt in enumerate(batch) for i in prompts[prompt]]
        owner = torch.tensor([p for p, _ in members], device=device)
        continuations = [pairs[i][1] for _, i in members]
        heads = torch.tensor([[c[0]] for c in continuations], device=device)
        picked = first[owner].gather(-1, heads)[:, 0]  # (C,): each continuation's first token
        totals, greedy = picked, first[owner].argmax(-1) == heads[:, 0]
        if max(len(c) for c in continuations) > 1:  # the rest, after the cached prompt
            check()
            rest, rest_mask = right_padded([c[:-1] for c in continuations], pad, device)
            cache = out.cache
            cache.batch_select_indices(owner)
            logits = model(
                input_ids=rest,
                attention_mask=torch.cat([mask[owner], rest_mask], 1),
                cache=cache,
                use_cache=True,
            ).logits.float()  # (C, L-1, V)
            targets, target_mask = right_padded([c[1:] for c in continuations], pad, device)
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1))
            totals = picked + (logprobs.squeeze(-1) * target_mask).sum(-1)
            missed = (logits.argmax(-1) != targets) & target_mask.bool()
            greedy = greedy & ~missed.any(-1)
        for (_, i), total, best in zip(members, totals.tolist(), greedy.tolist(), strict=True):
            scores[i] = ContinuationScore(total, best)
    return scores


def _prompt_batches(
    prompts: dict[tuple[int, ...], list[int]], batch_size: int
) -> Iterator[list[tuple[int, ...]]]:
    """Prompts of one length per batch, as many as keep their continuations within
    ``batch_size`` (one prompt at least)."""
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for prompt in prompts:
        by_length.setdefault(len(prompt), []).append(prompt)
    for group in by_length.values():
        batch: list[tuple[int, ...]] = []
        count = 0
        for prompt in group:
            if batch and count + len(prompts[prompt]) > batch_size:
                yield batch
                batch, count = [], 0
            batch.append(prompt)
            count += len(prompts[prompt])
        yield batch


def _exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: TaskRows,
    examples: list[Row],
    device: Any,
    check: StopCheckFunction,
) -> float:
    """Share of greedy outputs equal to the answer (both stripped); a long prompt keeps its
    end, where generation continues."""
    task = rows.task
    prompts = [
        _ids(tokenizer, row[task.prompt_field], True, rows, "prompt_field")[-task.max_length :]
        for row in examples
    ]
    length = max(map(len, prompts)) + task.max_new_tokens
    batch_size = batch_size_of(task, model, device, length, 1)
    outputs = greedy(
        model, prompts, task.max_new_tokens, tokenizer.eos_token_id, batch_size, device, check
    )
    correct = sum(
        tokenizer.decode(new, skip_special_tokens=True).strip() == row[task.answer_field].strip()
        for new, row in zip(outputs, examples, strict=True)
    )
    return correct / len(examples)


def _nll(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: TaskRows,
    examples: list[Row],
    device: Any,
    check: StopCheckFunction,
) -> float:
    """Mean negative log-likelihood per predicted token, over all texts (the first
    ``max_length`` tokens of each). Texts are batched in order of length, so a batch pads
    little."""
    task = rows.task
    texts = [
        tokenizer(row[task.text_field], add_special_tokens=True)["input_ids"][: task.max_length]
        for row in examples
    ]
    texts.sort(key=len)
    pad = pad_id(tokenizer)
    longest = len(texts[-1])
    batch_size = batch_size_of(task, model, device, longest, longest)
    total, count = 0.0, 0
    for chunk in chunks(texts, batch_size, check):
        for logprob in _token_logprobs(model, chunk, pad, device):
            total -= logprob.sum().item()
            count += logprob.numel()
    if count == 0:
        raise RecipeError(
            f"the texts of {rows.where} have no token to predict; give texts of at least two tokens",
            field=f"{rows.where}.text_field",
        )
    return total / count


def _classification(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: TaskRows,
    examples: list[Row],
    device: Any,
    check: StopCheckFunction,
) -> float:
    """Accuracy of a sequence classifier's argmax; label names map through the model's
    ``config.label2id``."""
    task = rows.task
    config = getattr(model, "config", None)
    label2id = dict(getattr(config, "label2id", None) or {})
    labels = [
        _label_id(row[task.label_field], label2id, getattr(config, "num_labels", None), rows)
        for row in examples
    ]
    texts = [
        _ids(tokenizer, row[task.text_field], True, rows, "text_field")[: task.max_length]
        for row in examples
    ]
    # A transformers classifier finds each sequence's last token by its config's pad id, and
    # refuses a batch when it has none: lend it the tokenizer's while it runs.
    pad = getattr(config, "pad_token_id", None)
    own_pad = isinstance(pad, int) and pad >= 0
    pad = pad if own_pad else pad_id(tokenizer)
    predicted: list[int] = []
    try:
        if config is not None and not own_pad:
            config.pad_token_id = pad
        longest = max(map(len, texts))
        batch_size = batch_size_of(task, model, device, longest, 1)
        for chunk in chunks(texts, batch_size, check):
            ids, mask = right_padded(chunk, pad, device)
            predicted += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    finally:
        if config is not None and not own_pad:
            config.pad_token_id = None
    return sum(p == label for p, label in zip(predicted, labels, strict=True)) / len(examples)


_EVALUATORS: dict[
    str, Callable[[torch.nn.Module, Any, TaskRows, list[Row], Any, StopCheckFunction], float]
] = {
    "multiple_choice": _multiple_choice,
    "exact_match": _exact_match,
    "nll": _nll,
    "classification": _classification,
}


def _label_id(value: Any, label2id: dict[str, int], num_labels: int | None, rows: TaskRows) -> int:
    if isinstance(value, str) and value in label2id:
        return label2id[value]
    if isinstance(value, int) or value.strip().isdigit():
        index = int(value)
        if num_labels is None or 0 <= index < num_labels:
            return index
    names = ", ".join(label2id)
    known = f"{names}, or ids 0 to {num_labels - 1}" if num_labels else names or "integer ids"
    raise RecipeError(
        f"label {excerpt(value)} in the examples of {rows.where} is not one of the model's labels ({known}); fix the data or label_field",
        field=f"{rows.where}.label_field",
    )


# Running the model


def _ids(tokenizer: Any, text: str, special: bool, rows: TaskRows, option: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if not ids:
        raise RecipeError(
            f"{excerpt(text)} in the examples of {rows.where} has no tokens; remove it or write a longer text",
            field=f"{rows.where}.{option}",
        )
    return ids


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad, else its eos, else 0: a causal LM's real positions never see the
    padding after them, so any id will do."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0


def chunks(items: list, size: int, check: StopCheckFunction) -> Iterator[list]:
    """Batches of ``size``, asking ``check()`` before each."""
    for start in range(0, len(items), size):
        check()
        yield items[start : start + size]


def right_padded(
    sequences: Sequence[list[int]], pad: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both (B, T)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    return ids, mask


def _token_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], pad: int, device: Any
) -> list[torch.Tensor]:
    """Per sequence, log p(token t | tokens before t) for t = 1 … len - 1."""
    ids, mask = right_padded(sequences, pad, device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return [picked[b, : len(s) - 1] for b, s in enumerate(sequences)]


def greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: int | None,
    batch_size: int,
    device: Any,
    check: StopCheckFunction = never_stop,
) -> list[list[int]]:
    """Each prompt's new tokens, greedily, until eos (kept) or ``max_new_tokens``: what
    transformers' greedy ``generate`` gives, token for token. Prompts of one length share a
    batch (at most ``batch_size``), so nothing is padded and positions need no care; each
    batch runs its prompts once and then one token per step over the attention cache."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    new: list[list[int]] = [[] for _ in prompts]
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            members = group[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in members], device=device)
            outputs = _greedy_batch(model, ids, max_new_tokens, eos, check)
            for i, tokens in zip(members, outputs, strict=True):
                new[i] = tokens
    return new


def _greedy_batch(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    eos: int | None,
    check: StopCheckFunction,
) -> list[list[int]]:
    """Greedy continuations of equally long prompts ``ids`` (B, T); ``check()`` before
    every forward. Only the last position's logits are computed, as ``generate`` does."""
    mask = torch.ones_like(ids)
    cache = None
    steps: list[torch.Tensor] = []
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        check()
        out = model(
            input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1
        )
        cache = out.cache
        token = out.logits[:, -1].argmax(-1)  # (B,)
        steps.append(token)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
    new = torch.stack(steps, 1).tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in new]


def batch_size_of(
    task: FitnessTask, model: torch.nn.Module, device: Any, length: int, scored: int
) -> int:
    """The task's ``batch_size`` where it sets one, else :func:`default_batch_size`."""
    return task.batch_size or default_batch_size(model, device, length, scored)


def default_batch_size(model: torch.nn.Module, device: Any, length: int, scored: int) -> int:
    """The batch size of a task that sets none: as many sequences of ``length`` tokens, of
    which ``scored`` positions get logits, as fit a memory budget, from 1 to the spec's limit
    (256). A sequence takes 4 bytes per logit (``scored`` × the vocabulary, in float for the
    log-softmax) and per key and value of every layer (``length`` × 2 × layers × hidden).

    On CUDA the budget is a quarter of the memory free once the model is there: large
    batches keep the GPU busy. On a CPU it is a quarter of the model's weight bytes, at least
    8 MiB (about a last-level cache): a forward reads every weight once, and a batch larger
    than that spends its time moving its own activations, not computing (nll on a 19M-parameter
    Llama took 5.5 s at batch 4 and 9.5 s at 256), while greedy decoding, which keeps one
    position's logits, still gets batches large enough to pay the per-call overhead rarely."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 32_000
    hidden = getattr(config, "hidden_size", None) or 4_096
    layers = getattr(config, "num_hidden_layers", None) or 32
    per_sequence = 4 * (scored * vocab + length * 2 * layers * hidden)
    place = torch.device(device)
    if place.type == "cuda":
        budget = torch.cuda.mem_get_info(place)[0] // 4
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = max(CPU_BATCH_MEMORY, weights // 4)
    return max(1, min(MAX_BATCH_SIZE, budget // per_sequence))
