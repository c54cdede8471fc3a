"""Git Re-Basin weight matching (Ainsworth et al. 2023): permute model B's hidden units so that
its weights lie as close as possible to model A's, with no data.

Coordinate descent: visit the groups in a seeded random order; for each, hold every other
permutation fixed and solve the linear assignment that maximises Σ⟨W_A, P·W_B⟩ over all the
tensors the group touches (its axis against the other axes already permuted); keep the new
permutation only if it scores strictly better. Stop after a pass in which nothing changed.
Each step costs O(n²·m) for the scores (n units, m weights per unit) and O(n³) for the solver.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

import torch

from merge_engine.align.assign import best_permutation, score_of
from merge_engine.align.models import ModelLike, check_compatible, resolve_spec, state_of
from merge_engine.align.result import Alignment, MatchReport
from merge_engine.align.spec import (
    Axis,
    Permutations,
    PermutationSpec,
    apply_permutation,
    axis_index,
    check_permutations,
    identity,
)
from merge_engine.errors import RecipeError

# A new permutation must beat the current one by this fraction of the score: float ties
# between equally good permutations must not count as progress, or the search never stops.
TOLERANCE = 1e-9


def _units(tensor: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """(slots, everything else): one row per unit (or key/value slot) along ``dim``."""
    moved = tensor.movedim(dim, 0)
    # (repeat, slots, unit, rest) -> (slots, repeat·unit·rest)
    grid = moved.reshape(axis.repeat, -1, axis.unit, moved[0].numel())
    return grid.transpose(0, 1).reshape(grid.shape[1], -1)


def _permute_other_axes(
    tensor: torch.Tensor, name: str, keep: int, spec: PermutationSpec, perms: Permutations
) -> torch.Tensor:
    for dim, axis in enumerate(spec.axes[name]):
        if axis is not None and dim != keep:
            index = axis_index(spec.groups[axis.group], axis, perms[axis.group])
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


def group_scores(
    group: str,
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Permutations,
    touching: list[tuple[str, int, Axis]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores over units, scores over key/value slots or None) for one coordinate step."""
    size, share = spec.groups[group]
    scores = torch.zeros(size, size, dtype=torch.float64)
    blocks = None
    for name, dim, axis in touching:
        if name not in a:  # integer buffers carry no signal
            continue
        other = _permute_other_axes(b[name], name, dim, spec, perms)
        s = (_units(a[name], dim, axis) @ _units(other, dim, axis).T).double().cpu()
        if axis.shared and share > 1:
            blocks = s if blocks is None else blocks + s
        else:
            scores += s
    return scores, blocks


def objective(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perms: Permutations,
) -> float:
    """Σ⟨W_A, P·W_B⟩ over every floating-point tensor."""
    permuted = apply_permutation(b, _float_spec(spec, b), perms)
    return float(sum(torch.vdot(a[k].reshape(-1), permuted[k].reshape(-1)) for k in a))


def _float_spec(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> PermutationSpec:
    return PermutationSpec(spec.groups, {k: spec.axes[k] for k in state}, spec.probes, spec.family)


def weight_matching(
    model_a: ModelLike,
    model_b: ModelLike,
    spec: PermutationSpec | None = None,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    device: str = "cpu",
) -> Alignment:
    """Permutations of B's groups that bring B's weights closest to A's, and a report.
    ``permute_model(model_b, perms)`` then computes what B computed, aligned to A."""
    if max_iter < 1:
        raise RecipeError(f"max_iter must be at least 1, got {max_iter}", field="max_iter")
    start = time.perf_counter()
    spec = resolve_spec(spec, model_a, model_b)
    sa, sb = state_of(model_a), state_of(model_b)
    check_compatible(sa, sb)
    spec.check_shapes({k: tuple(v.shape) for k, v in sa.items()})
    # float32 scores (also for half-precision models), float64 sums and solver
    a = {k: v.to(device, torch.float32) for k, v in sa.items() if v.is_floating_point()}
    b = {k: v.to(device, torch.float32) for k, v in sb.items() if v.is_floating_point()}
    perms = {k: v.long().clone() for k, v in (init or identity(spec)).items()}
    check_permutations(spec, perms)
    touching = spec.touching()
    order = sorted(spec.groups)
    rng = random.Random(seed)
    history = [objective(spec, a, b, perms)]
    converged = False
    iterations = 0
    while iterations < max_iter and not converged:
        iterations += 1
        changed = False
        rng.shuffle(order)
        for group in order:
            share = spec.groups[group].share
            scores, blocks = group_scores(group, spec, a, b, perms, touching[group])
            new, new_score = best_permutation(scores, blocks, share)
            old_score = score_of(perms[group], scores, blocks, share)
            if new_score - old_score > TOLERANCE * max(1.0, abs(old_score)):
                perms[group] = new
                changed = True
        history.append(objective(spec, a, b, perms))
        converged = not changed
    report = MatchReport(
        "weight_matching", iterations, history, converged, time.perf_counter() - start
    )
    return Alignment(perms, report)
