"""The forward-pass side of the methods that need data: one model in memory at a time, hooks
that collect what the merge needs, saved as safetensors so the merge pass stays streaming and
a second merge with other coefficients recomputes nothing.

- ``gram_matrices``: for every ``nn.Linear``, G = XᵀX of its inputs (RegMean), in float64.
- ``fisher_diagonal``: for every parameter, the mean over examples of the squared gradient of
  the example's log-likelihood. ``empirical`` uses the data's labels (the next tokens, for a
  causal LM); ``exact`` samples the labels from the model's own distribution.

A batch is what the model takes: a tensor, an ``(inputs, labels)`` pair for a plain module, or
a dict of keyword arguments for a transformers model (``labels`` for classification).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from merge_engine.errors import MergeError

FisherMode = Literal["empirical", "exact"]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def gram_matrices(
    model: nn.Module, batches: Iterable[Any], device: str = "cpu", progress: bool = False
) -> dict[str, torch.Tensor]:
    """``{"<linear>.weight": XᵀX}`` over every input row each linear layer sees."""
    model = model.to(device).eval()
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def collect(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            gram = x.T @ x
            grams[name] = grams[name] + gram if name in grams else gram

        return collect

    handles = [
        m.register_forward_hook(hook(f"{n}.weight" if n else "weight"))
        for n, m in linear_layers(model).items()
    ]
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="Gram matrices", unit="batch", disable=not progress):
                _forward(model, _to(batch, torch.device(device)))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise MergeError("the calibration data is empty: give each model at least one batch")
    return {name: gram.cpu() for name, gram in grams.items()}


def _examples(batch: Any) -> list[Any]:
    """Split a batch into single examples (per-example gradients)."""
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, dict):
        size = next(iter(batch.values())).shape[0]
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
    x, y = batch
    return [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]


def _log_likelihood(
    model: nn.Module, example: Any, mode: FisherMode, generator: torch.Generator | None
) -> torch.Tensor:
    output = _forward(model, example)
    logits = output.logits if hasattr(output, "logits") else output
    if logits.dim() == 3:  # a causal LM: every next token is a prediction
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        if mode == "exact":
            targets = torch.multinomial(
                logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator
            )
            targets = targets.reshape(logp.shape[:-1])
        else:
            targets = example["input_ids"][:, 1:]
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = example.get("attention_mask") if isinstance(example, dict) else None
        return (picked * mask[:, 1:]).sum() if mask is not None else picked.sum()
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "exact":
        target = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    elif isinstance(example, dict) and "labels" in example:
        target = example["labels"]
    elif isinstance(example, (tuple, list)):
        target = example[1]
    else:
        target = logp.argmax(-1)  # no labels: the model's own prediction
    return logp.gather(-1, target.reshape(-1, 1)).sum()


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    mode: FisherMode = "empirical",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{parameter name: mean over examples of (∂ log p / ∂θ)²}``."""
    model = model.to(device).eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator(device=device).manual_seed(seed) if mode == "exact" else None
    count = 0
    for batch in tqdm(batches, desc="Fisher", unit="batch", disable=not progress):
        for example in _examples(_to(batch, torch.device(device))):
            model.zero_grad(set_to_none=True)
            _log_likelihood(model, example, mode, generator).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise MergeError("the calibration data is empty: give each model at least one batch")
    return {name: (f / count).cpu() for name, f in fisher.items()}


def save_stats(stats: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
    return path


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
