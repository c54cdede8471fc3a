"""The built-in evaluators: a task's examples in, one number per task out, higher is better.

Reading (:func:`read_tasks`) happens once, before the search: each split's data is pinned,
fetched and read the way calibration data is (:mod:`merge_engine.data.calibration`), every field
the task reads is checked in every example, and the search data is split when the task gives
no held-out data. Evaluating (:func:`evaluate`) scores one candidate on one split of every task.

Greedy decoding and choice scoring, over the attention cache, are
:mod:`merge_engine.evolve.decoding`'s; the rows and scores, :mod:`merge_engine.evolve.task_rows`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_engine.data import calibration
from merge_engine.errors import RecipeError, excerpt
from merge_engine.evolve.decoding import (
    batch_size_of,
    choice_scores,
    chunks,
    greedy,
    pad_id,
    right_padded,
    token_logprobs,
)
from merge_engine.evolve.spec import FitnessTask, TaskData
from merge_engine.evolve.stopping import StopCheckFunction, never_stop
from merge_engine.evolve.task_rows import Row, Score, TaskRows, split_examples

SPLITS = ("search", "held_out")
METRICS = {
    "multiple_choice": "accuracy",
    "exact_match": "exact_match",
    "nll": "nll",
    "classification": "accuracy",
}


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
        search, held_out = split_examples(search, task.held_out_fraction, task.data.seed, where)
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
        for logprob in token_logprobs(model, chunk, pad, device):
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
