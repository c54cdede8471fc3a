"""What an alignment returns: the permutations and how the search went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from merge_engine.align.spec import Permutations


@dataclass(frozen=True)
class MatchReport:
    """``objective[0]`` is the score before any step (identity, or the initial permutations);
    ``objective[k]`` after pass k. Weight matching scores Σ⟨W_A, P·W_B⟩ over every tensor;
    activation matching the summed correlation of matched units. ``converged``: the last pass
    changed no permutation (always true for activation matching, which is one pass)."""

    method: str
    iterations: int
    objective: list[float]
    converged: bool
    seconds: float


class Alignment(NamedTuple):
    perms: Permutations
    report: MatchReport
