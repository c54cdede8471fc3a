"""Activation matching (Ainsworth et al. 2023, after Li et al. 2016): run both models on the
same calibration batches, correlate every hidden unit of A with every unit of B in the same
group, and match units by linear assignment on the correlations. Each group is solved once:
its activations do not depend on how the other groups are permuted.

Moments are accumulated in float64 over all batches, so no activation is kept beyond its
batch. A unit of several features (a head: ``head_dim`` features) scores the sum of the
correlations of its features in the same position.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from merge_engine.align.assign import best_permutation, score_of
from merge_engine.align.models import check_compatible, resolve_spec, state_of
from merge_engine.align.result import Alignment, MatchReport
from merge_engine.align.spec import PermutationSpec, Probe
from merge_engine.data.stats import run_model, to_device, token_mask
from merge_engine.errors import MergeError, RecipeError


class Moments:
    """Running first and second moments of two activation streams and their cross product."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: list[torch.Tensor] = []
        self.squares: list[torch.Tensor] = []
        self.cross: torch.Tensor | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        if self.cross is None:
            self.sums = [a.sum(0), b.sum(0)]
            self.squares = [(a * a).sum(0), (b * b).sum(0)]
            self.cross = a.T @ b
        else:
            self.sums = [self.sums[0] + a.sum(0), self.sums[1] + b.sum(0)]
            self.squares = [self.squares[0] + (a * a).sum(0), self.squares[1] + (b * b).sum(0)]
            self.cross += a.T @ b
        self.count += a.shape[0]

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        mean_a, mean_b = (s / self.count for s in self.sums)
        std_a, std_b = (
            (q / self.count - m * m).clamp_min(0).sqrt()
            for q, m in zip(self.squares, (mean_a, mean_b), strict=True)
        )
        covariance = self.cross / self.count - torch.outer(mean_a, mean_b)
        return covariance / (torch.outer(std_a, std_b) + eps)


def features(x: torch.Tensor, probe: Probe) -> torch.Tensor:
    """(examples, features): every position (token, pixel) of every example is one sample."""
    x = x.detach().movedim(probe.dim, -1)
    return x.reshape(-1, x.shape[-1]).float()


def capture(model: nn.Module, probes: dict[str, Probe], into: dict[str, torch.Tensor]) -> list:
    """Forward hooks that store each probed activation in ``into[group]``; returns the handles."""
    modules = dict(model.named_modules())
    handles = []
    for group, probe in probes.items():
        if probe.module not in modules:
            raise MergeError(
                f"the model has no module {probe.module} to read group {group} from; build the "
                f"spec from this model"
            )

        def store(_m: nn.Module, args: Any, output: Any = None, group=group, probe=probe) -> None:
            into[group] = features(args[0] if probe.input else output, probe)

        module = modules[probe.module]
        if probe.input:
            handles.append(module.register_forward_pre_hook(store))
        else:
            handles.append(module.register_forward_hook(store))
    return handles


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    spec: PermutationSpec | None = None,
    *,
    device: str = "cpu",
) -> Alignment:
    """Permutations of B's groups that best correlate B's hidden units with A's.

    ``batches`` is what the models take: a tensor, an ``(inputs, labels)`` pair, or a dict of
    keyword arguments for a transformers model. Every group of the spec needs a probe (the
    stack and transformer specs have one for each)."""
    start = time.perf_counter()
    spec = resolve_spec(spec, model_a)
    sa = state_of(model_a)
    check_compatible(sa, state_of(model_b))
    spec.check_shapes({k: tuple(v.shape) for k, v in sa.items()})
    unprobed = sorted(set(spec.groups) - set(spec.probes))
    if unprobed:
        raise RecipeError(
            f"group {unprobed[0]} has no activation probe in the spec; use weight_matching "
            f"or add a Probe for it",
            field="spec",
        )
    moments = {group: Moments() for group in spec.groups}
    acts_a: dict[str, torch.Tensor] = {}
    acts_b: dict[str, torch.Tensor] = {}
    models = [m.to(device).eval() for m in (model_a, model_b)]
    handles = capture(models[0], spec.probes, acts_a) + capture(models[1], spec.probes, acts_b)
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, torch.device(device))
                run_model(models[0], batch)
                run_model(models[1], batch)
                keep = token_mask(batch)
                for group, m in moments.items():
                    a, b = acts_a[group], acts_b[group]
                    if keep is not None and a.shape[0] == keep.numel():
                        a, b = a[keep], b[keep]
                    m.add(a, b)
    finally:
        for handle in handles:
            handle.remove()
    if any(m.count == 0 for m in moments.values()):
        raise MergeError("the calibration data is empty: give at least one batch")
    perms, before, after = {}, 0.0, 0.0
    for group, m in moments.items():
        size, share = spec.groups[group]
        unit = spec.probes[group].unit
        corr = m.correlation()
        # (size·unit)² -> size²: a unit's score is the sum over its features in the same place
        scores = corr.reshape(size, unit, size, unit).diagonal(dim1=1, dim2=3).sum(-1)
        perms[group], value = best_permutation(scores, None, share)
        before += score_of(torch.arange(size), scores, None, share)
        after += value
    report = MatchReport(
        "activation_matching", 1, [before, after], True, time.perf_counter() - start
    )
    return Alignment(perms, report)
