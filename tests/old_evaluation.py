"""The loops that scored candidates before evaluation ran over the attention cache, kept as
the independent reference that tests/test_evolve_fitness.py compares scores with and that
benchmarks/bench_evaluation.py times. A helper module (not a test file)."""

from __future__ import annotations

import torch


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, both (B, T), padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def old_greedy(
    model, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int
) -> list[list[int]]:
    """Greedy decoding of one batch: right-padded, the whole sequence every step, no cache."""
    device = next(model.parameters()).device
    sequences, new = [list(p) for p in prompts], [[] for _ in prompts]
    running = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not running:
            break
        ids, mask = right_padded([sequences[i] for i in running], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = (mask.sum(-1) - 1).to(device)
        tokens = logits[torch.arange(len(running), device=device), last].argmax(-1)
        for i, token in zip(running, tokens.tolist(), strict=True):
            sequences[i].append(token)
            new[i].append(token)
        running = [i for i in running if new[i][-1] != eos]
    return new


def old_logprobs(model, sequences: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Per sequence, log p(token t | tokens before t), from one right-padded forward."""
    device = next(model.parameters()).device
    ids, mask = right_padded(sequences, pad)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [picked[b, : len(s) - 1] for b, s in enumerate(sequences)]
