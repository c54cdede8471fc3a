"""The merged tensors written under another layout's names (a recipe's ``output_layout``), each
target as soon as its parts are merged; the plan decided the targets
(:func:`merge_engine.plan.writes.plan_writes`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from merge_engine.plan.merge_plan import TensorTask
from merge_engine.sources.formats.sd_names import Renamed


def converted(
    merged: Iterator[tuple[TensorTask, torch.Tensor]], writes: list[Renamed]
) -> Iterator[tuple[Renamed, torch.Tensor]]:
    """Each target of ``writes`` as soon as its parts are merged, holding a merged tensor only
    until its last target is written."""
    waiting = {part: 0 for r in writes for part in r.parts}
    for r in writes:
        for part in r.parts:
            waiting[part] += 1
    held: dict[str, torch.Tensor] = {}
    position = 0
    for task, tensor in merged:
        held[task.output] = tensor
        while position < len(writes) and all(p in held for p in writes[position].parts):
            target = writes[position]
            yield target, target.apply([held[p] for p in target.parts])
            for part in target.parts:
                waiting[part] -= 1
                if not waiting[part]:
                    del held[part]
            position += 1
