"""A fitness task's examples as read and checked, the score of one task, and the split of a
task's data into search and held-out rows: what the built-in evaluators
(:mod:`merge_engine.evolve.fitness`) and lm-eval tasks (:mod:`merge_engine.evolve.lm_eval_tasks`)
share."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from merge_engine.errors import RecipeError
from merge_engine.evolve.spec import FitnessTask

Row = dict[str, Any]


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


def split_examples(found: list, fraction: float, seed: int, where: str) -> tuple[list, list]:
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
