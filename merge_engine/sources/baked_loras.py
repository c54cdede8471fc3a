"""LoRAs baked into a diffusion checkpoint while its tensors stream: what the pre-flight decided
(:class:`BakedLora`: a LoRA file, and each module's target tensor and strength) turned into the
deltas of :class:`merge_engine.sources.low_rank.AdaptedStore` once the files are on disk.

A module's scale is ``alpha / r`` (the ``.alpha`` tensor, read when the merge starts: it is a
value, not in the header) times its strength; the strength is the entry's ``strength`` times its
block's. A target that is some rows of a fused tensor (OpenCLIP's ``in_proj_weight`` in a
single-file SDXL) gets an up matrix padded with zero rows, so its delta leaves the other rows
exactly as they were. A half-precision checkpoint gets what diffusers' ``fuse_lora`` gives it:
the factors rounded to its dtype, their product in float32, rounded, then added.
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


@dataclass(frozen=True)
class _View:
    key: str  # the factor's name in the LoRA file
    dtype: torch.dtype  # the checkpoint tensor's
    rows: tuple[int, int, int] | None  # an up factor's place in a fused tensor: start, end, total


class _FactorStore:
    """A LoRA file's factors as the checkpoint's weights receive them: in the weight's dtype
    (diffusers and the WebUI load a LoRA in the model's dtype before fusing it), and an up
    factor of some rows of a fused tensor padded with zero rows to the whole tensor."""

    def __init__(self, store: TensorStore, views: dict[str, _View]):
        self.store = store
        self.views = views
        self.tensors = getattr(store, "tensors", {})

    def get(self, name: str) -> torch.Tensor:
        view = self.views[name]
        factor = self.store.get(view.key).to(view.dtype)
        if view.rows is None:
            return factor
        start, end, total = view.rows
        padded = factor.new_zeros((total, *factor.shape[1:]))
        padded[start:end] = factor
        return padded

    def release(self, file: str) -> None:
        self.store.release(file)


def bake_store(base: TensorStore, loras: Sequence[BakedLora], infos: dict) -> AdaptedStore:
    """``base`` with every LoRA's deltas added, in order, as PEFT fuses a LoRA (diffusers'
    ``fuse_lora``): the product in float32 from factors in the weight's dtype, times the scale,
    rounded to the weight's dtype, then added (``infos``: the checkpoint's tensor infos)."""
    deltas: dict[str, list[LowRankDelta]] = defaultdict(list)
    for lora in loras:
        raw = lora.source.store()
        views = {}
        for target in lora.targets:  # a module's factors under its own name: q, k and v of
            info = infos[target.tensor]  # a fused tensor are three modules of one tensor
            rows = None if target.rows is None else (*target.rows, info.shape[0])
            views[target.module.up] = _View(target.module.up, info.dtype, rows)
            views[target.module.down] = _View(target.module.down, info.dtype, None)
        store = _FactorStore(raw, views)
        for target, strength in zip(lora.targets, lora.strengths, strict=True):
            module = target.module
            alpha = float(raw.get(module.alpha).item()) if module.alpha else module.rank
            scale = alpha / module.rank * strength
            delta = LowRankDelta(store, module.up, module.down, scale, rounded_first=True)
            deltas[target.tensor].append(delta)
    return AdaptedStore(base, deltas)
