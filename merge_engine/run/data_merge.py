"""Merging with data, on models in memory: each model's own calibration batches decide how its
weights count. ``models`` are ``nn.Module``s of one architecture; ``batches`` holds one iterable
of batches per model (see :mod:`merge_engine.data.stats` for what a batch is)::

    merged = regmean_merge([model_a, model_b], [batches_a, batches_b], alpha=0.9)
    merged = fisher_merge([model_a, model_b], [batches_a, batches_b])
    model_a.load_state_dict(merged)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from merge_engine.data.stats import (
    FisherMode,
    Statistic,
    fisher_diagonal,
    gram_matrices,
    mean_of,
    transposed_weights,
)
from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.methods.with_data import fisher, regmean


def _states(models: Sequence[nn.Module], batches: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
    if len(models) < 2:
        raise RecipeError("merging needs at least two models", field="models")
    if len(batches) != len(models):
        raise RecipeError(
            f"give one set of calibration batches per model: {len(models)} models, {len(batches)} sets",
            field="calibration",
        )
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    for index, state in enumerate(states[1:], start=2):
        for name, tensor in states[0].items():
            other = state.get(name)
            if other is None or other.shape != tensor.shape:
                found = "has no" if other is None else f"has shape {tuple(other.shape)} for"
                raise IncompatibleModelsError(
                    f"model {index} {found} {name} (model 1: {tuple(tensor.shape)}); the models must share one architecture"
                )
    return states


def regmean_merge(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    alpha: float = 0.9,
    ridge: float = 1e-6,
    exclude: Sequence[str] = (),
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """RegMean: every linear weight from the closed form over its inputs' Gram matrices;
    everything else (biases, norms, embeddings, and names containing an ``exclude`` string,
    such as task-specific heads) the plain average."""
    if not 0 <= alpha <= 1:
        raise RecipeError(f"alpha must lie in [0, 1], got {alpha}", field="parameters.alpha")
    states = _states(models, batches)
    transposed = transposed_weights(models[0])
    grams = [gram_matrices(m, b, device, progress) for m, b in zip(models, batches, strict=True)]
    merged = {}
    for name in states[0]:
        tensors = [state[name] for state in states]
        if not tensors[0].is_floating_point():  # an integer buffer: model 1's
            merged[name] = tensors[0].clone()
            continue
        stats = [
            None if name not in g else Statistic(g[name], transposed=name in transposed)
            for g in grams
        ]
        use_data = not any(part in name for part in exclude)
        merged[name] = regmean(
            tensors, None, alpha=alpha, ridge=ridge, use_data=use_data, stats=stats
        )
    return merged


def fisher_merge(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    normalize: bool = True,
    mode: FisherMode = "empirical",
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fisher merging: θ* = Σ λᵢ Fᵢ θᵢ / Σ λᵢ Fᵢ per entry. ``normalize`` (the default) divides
    each model's Fisher by its mean over the whole model, so a model whose data gives larger
    gradients does not outweigh the others (``False`` is the paper's plain form)."""
    states = _states(models, batches)
    weights = list(weights) if weights is not None else [1.0] * len(models)
    fishers = [
        fisher_diagonal(m, b, mode, device, progress=progress)
        for m, b in zip(models, batches, strict=True)
    ]
    means = [mean_of(f.values()) for f in fishers]
    merged = {}
    for name in states[0]:
        tensors = [state[name] for state in states]
        if not tensors[0].is_floating_point():  # an integer buffer: model 1's
            merged[name] = tensors[0].clone()
            continue
        stats = [
            None if name not in f else Statistic(f[name], model_mean=mean)
            for f, mean in zip(fishers, means, strict=True)
        ]
        merged[name] = fisher(
            tensors,
            None,
            weight=weights,
            floor=floor,
            normalize=normalize,
            fisher=mode,
            use_data=True,
            stats=stats,
        )
    return merged
