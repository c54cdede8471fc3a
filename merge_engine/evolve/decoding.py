"""Running a causal LM over token ids at transformers' ``generate`` speed: greedy decoding and
continuation scores over the attention cache, batch sizes from the model and the device.

The model is a transformers model (a parameter-space candidate, or the container of a layer
path, whose slots each have their own cache entry): called as ``model(input_ids=...,
attention_mask=..., cache=..., use_cache=..., logits_to_keep=...)``, it returns ``.logits`` and
``.cache``. Prompts that run together have one length, so nothing is padded; what runs after a
cached prompt (choices) and whole texts (nll) are right-padded, so padding never changes the
logits of real positions. The built-in evaluators (:mod:`merge_engine.evolve.fitness`) and the
lm-eval model (:mod:`merge_engine.evolve.lm_eval_model`) both decode and score through here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from merge_engine.evolve.spec import MAX_BATCH_SIZE, FitnessTask
from merge_engine.evolve.stopping import StopCheckFunction, never_stop

CPU_BATCH_MEMORY = 8 << 20
"""Bytes of logits and cache a batch may take on a CPU at least (:func:`default_batch_size`)."""


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


def token_logprobs(
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
