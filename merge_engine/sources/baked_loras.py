"""LoRAs baked into a diffusion checkpoint while its tensors stream: what the pre-flight decided
(:class:`BakedLora`: a LoRA file, and each module's target tensor and strength) turned into the
deltas of :class:`merge_engine.sources.low_rank.AdaptedStore` once the files are on disk.

A module's scale is ``alpha / r`` (the ``.alpha`` tensor, read when the merge starts: it is a
value, not in the header) times its strength; the strength is the entry's ``strength`` times its
block's. A target that is some rows of a fused tensor (OpenCLIP's ``in_proj_weight`` in a
single-file SDXL) gets an up matrix padded with zero rows, so its delta leaves the other rows
exactly as they were.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from merge_engine.sources.formats.kohya_lora import LoraTarget, lora_targets, read_lora_modules
from merge_engine.sources.formats.layouts import Layout
from merge_engine.sources.low_rank import AdaptedStore, LowRankDelta
from merge_engine.sources.tensors import TensorInfo, TensorStore


class _Opens(Protocol):
    """What baking reads of a checkpoint's or a LoRA file's source (a ``ModelSource``)."""

    ref: Any
    tensors: dict[str, TensorInfo]
    layout: Layout

    def store(self) -> TensorStore: ...


@dataclass(frozen=True)
class BakedLora:
    """One LoRA file baked into a checkpoint: which module changes which tensor, how strongly."""

    source: _Opens
    """The LoRA file as inspected (downloaded with the checkpoint it is baked into)."""
    targets: tuple[LoraTarget, ...]
    strengths: tuple[float, ...]
    """Per target: the entry's strength times its block's; a target at 0 is left out."""
    strength: float
    """The entry's strength, as the card shows it."""

    def by_block(self, values: Mapping[str, float]) -> BakedLora:
        """The same LoRA with each target's strength times its block's value (a target at 0
        left out); ``values`` names every block a target is in."""
        kept = [
            (t, s * values[t.block])
            for t, s in zip(self.targets, self.strengths, strict=True)
            if s * values[t.block] != 0
        ]
        return replace(self, targets=tuple(t for t, _ in kept), strengths=tuple(s for _, s in kept))


def bake_lora(model: _Opens, lora: _Opens, strength: float = 1.0) -> BakedLora:
    """The LoRA file ``lora`` baked into the checkpoint ``model`` at ``strength``, from the
    headers of both; a file that is no plain LoRA, or one made for another model, is refused
    in one sentence."""
    shapes = {name: info.shape for name, info in lora.tensors.items()}
    modules = read_lora_modules(shapes, str(lora.ref))
    checkpoint = {name: info.shape for name, info in model.tensors.items()}
    targets = lora_targets(modules, model.layout, checkpoint, str(lora.ref), str(model.ref))
    return BakedLora(lora, tuple(targets), (strength,) * len(targets), strength)


class _PaddedUpStore:
    """A LoRA store whose up matrices named in ``rows`` come out as the rows
    ``[start, end)`` of a zero matrix of ``total`` rows: a delta to some rows of a fused tensor."""

    def __init__(self, store: TensorStore, rows: dict[str, tuple[str, int, int, int]]):
        self.store = store
        self.rows = rows
        self.tensors = getattr(store, "tensors", {})

    def get(self, name: str) -> torch.Tensor:
        if name not in self.rows:
            return self.store.get(name)
        key, start, end, total = self.rows[name]
        up = self.store.get(key)
        padded = up.new_zeros((total, *up.shape[1:]))
        padded[start:end] = up
        return padded

    def release(self, file: str) -> None:
        self.store.release(file)


def bake_store(base: TensorStore, loras: Sequence[BakedLora], shapes: dict) -> AdaptedStore:
    """``base`` with every LoRA's deltas added, in order (``shapes``: the checkpoint's tensors'
    infos, for the row count of a fused target)."""
    deltas: dict[str, list[LowRankDelta]] = defaultdict(list)
    for lora in loras:
        raw = lora.source.store()
        rows = {}
        for target in lora.targets:
            if target.rows is not None:
                start, end = target.rows
                total = shapes[target.tensor].shape[0]
                rows[f"{target.module.up}#rows{start}"] = (target.module.up, start, end, total)
        store = _PaddedUpStore(raw, rows) if rows else raw
        for target, strength in zip(lora.targets, lora.strengths, strict=True):
            module = target.module
            alpha = float(raw.get(module.alpha).item()) if module.alpha else module.rank
            up = module.up if target.rows is None else f"{module.up}#rows{target.rows[0]}"
            scale = alpha / module.rank * strength
            deltas[target.tensor].append(LowRankDelta(store, up, module.down, scale))
    return AdaptedStore(base, deltas)
