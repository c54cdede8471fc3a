"""REPAIR and RESET (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair"): the midpoint of two aligned networks loses variance in its hidden
units ("variance collapse"), which makes most of what remains of the loss barrier.

- REPAIR: for every hidden Linear/Conv2d output channel (the pre-activation, as in the paper),
  measure the mean μ and std σ on calibration data in A, in B and in the interpolated network;
  rescale the channel so that its statistics become the interpolation of the endpoints',
  μ* = (1 − t)·μ_A + t·μ_B, σ* = (1 − t)·σ_A + t·σ_B, and fold the affine correction into the
  layer: rows ×= σ*/σ, bias ← (bias − μ)·σ*/σ + μ*. Layers are corrected in order, each
  measured after the ones before it were fixed.
- RESET: where a BatchNorm follows the layer, it already normalises; only its running
  statistics are stale, so they are recomputed on the calibration data instead.

Covers Linear/Conv2d stacks (the MLPs and CNNs of :mod:`.stack`); transformers are refused.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from merge_engine.align.models import check_compatible, spec_for, state_of
from merge_engine.align.stack import _leaves, weight_layers
from merge_engine.data.stats import run_model, to_device
from merge_engine.errors import MergeError, RecipeError

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


def _channels(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(samples, channels): every position of every example is one sample of each channel."""
    dim = 1 if isinstance(layer, nn.Conv2d) else -1
    x = x.detach().movedim(dim, -1)
    return x.reshape(-1, x.shape[-1]).double()


def channel_stats(
    model: nn.Module,
    layers: list[str],
    batches: list[Any],
    device: str,
    stop_after: str | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (mean, population variance)}`` of each layer's output channels. With
    ``stop_after``, the forward pass ends once that layer has run."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in layers}

    def hook(name: str):
        def collect(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            x = _channels(output, module)
            total = sums[name]
            total[0] += x.shape[0]
            total[1] = total[1] + x.sum(0)
            total[2] = total[2] + (x * x).sum(0)
            if name == stop_after:
                raise _Stop

        return collect

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    run_model(model, to_device(batch, torch.device(device)))
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        stats[name] = (mean, (squares / count - mean * mean).clamp_min(0))
    return stats


def _next_weighted(model: nn.Module) -> dict[str, nn.Module | None]:
    """For every Linear/Conv2d: the next module holding weights (a norm or a layer), if any."""
    held = [
        (n, m)
        for n, m in _leaves(model)
        if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))
    ]
    return {n: (held[i + 1][1] if i + 1 < len(held) else None) for i, (n, _) in enumerate(held)}


def _calibration(batches: Iterable[Any]) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise MergeError("the calibration data is empty: give at least one batch")
    return batches


def _check_stack(model: nn.Module) -> None:
    family = spec_for(model).family
    if family != "stack":
        raise RecipeError(
            f"REPAIR covers Linear/Conv2d stacks, not {family} models; merge without repair",
            field="repair",
        )


def repair(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    t: float = 0.5,
    *,
    device: str = "cpu",
    eps: float = 1e-5,
) -> nn.Module:
    """A copy of ``merged`` (the interpolation of A and the aligned B at ``t``) whose hidden
    channels have the interpolated endpoint statistics; BatchNorm layers are RESET instead."""
    if not 0 <= t <= 1:
        raise RecipeError(f"t must lie in [0, 1], got {t}", field="t")
    _check_stack(merged)
    merged_state = state_of(merged)
    check_compatible(merged_state, state_of(model_a))
    check_compatible(merged_state, state_of(model_b))
    batches = _calibration(batches)
    hidden = [name for name, _ in weight_layers(merged)][:-1]
    targets = [
        channel_stats(m.to(device).eval(), hidden, batches, device) for m in (model_a, model_b)
    ]
    fixed = copy.deepcopy(merged).to(device).eval()
    modules = dict(fixed.named_modules())
    after = _next_weighted(fixed)
    for name in hidden:
        mean, var = channel_stats(fixed, [name], batches, device, stop_after=name)[name]
        layer, norm = modules[name], after[name]
        if isinstance(norm, _BATCHNORMS):  # RESET
            norm.running_mean.copy_(mean.to(norm.running_mean))
            norm.running_var.copy_(var.to(norm.running_var))
            continue
        goal_mean = torch.lerp(targets[0][name][0], targets[1][name][0], t)
        goal_std = torch.lerp(targets[0][name][1].sqrt(), targets[1][name][1].sqrt(), t)
        std = var.sqrt()
        # a channel that does not vary in the merged network (dead) only has its mean moved
        scale = torch.where(std > eps, goal_std / std.clamp_min(eps), torch.ones_like(std))
        with torch.no_grad():
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(scale.reshape(shape).to(layer.weight))
            if layer.bias is not None:  # without a bias only the spread can be restored
                new_bias = (layer.bias.double() - mean) * scale + goal_mean
                layer.bias.copy_(new_bias.to(layer.bias))
    return fixed


def reset_batchnorm(model: nn.Module, batches: Iterable[Any], *, device: str = "cpu") -> nn.Module:
    """RESET only: a copy of ``model`` with every BatchNorm's running statistics recomputed
    on ``batches`` (a cumulative average, as if the statistics were tracked from scratch)."""
    batches = _calibration(batches)
    fixed = copy.deepcopy(model).to(device).eval()
    norms = [m for m in fixed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for batch in batches:
            run_model(fixed, to_device(batch, torch.device(device)))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
        norm.eval()
    return fixed
