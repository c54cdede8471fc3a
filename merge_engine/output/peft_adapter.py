"""Writing a PEFT LoRA adapter folder: ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` loads, ``adapter_model.safetensors`` streamed one tensor at a
time by :class:`~merge_engine.output.shards.ShardedWriter` (its header first, from the shapes
the :class:`PeftAdapter` declares), and a ``README.md`` card with ``library_name: peft`` and
``base_model`` front matter.

PEFT's names, for a module ``model.layers.0.self_attn.q_proj`` of the base:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (down, r × in; conv
r × in × kh × kw) and ``...lora_B.weight`` (up, out × r; conv out × r × 1 × 1), whose update is
``scale · B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA); an
embedding's are ``...lora_embedding_A`` (r × vocab) and ``...lora_embedding_B`` (dim × r), its
update ``scale · (B @ A)ᵀ``; a module saved whole (``modules_to_save``) is its tensors under
``base_model.model.<tensor name>``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCardData

from merge_engine.output.shards import ShardedWriter
from merge_engine.plan.merge_plan import PlannedTensor
from merge_engine.sources.formats.peft_adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from merge_engine.sources.layers import sort_key


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank update: its module path in the base model (``.weight`` left
    off), the shapes of its up (B) and down (A) factors, and its ``lora_alpha``."""

    name: str
    up_shape: tuple[int, ...]
    down_shape: tuple[int, ...]
    alpha: float
    embedding: bool = False
    """An ``nn.Embedding``: PEFT names its factors ``lora_embedding_B``/``_A`` and applies
    their product transposed."""

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def down_name(self) -> str:
        return (
            f"{PREFIX}{self.name}.lora_embedding_A"
            if self.embedding
            else f"{PREFIX}{self.name}.lora_A.weight"
        )

    @property
    def up_name(self) -> str:
        return (
            f"{PREFIX}{self.name}.lora_embedding_B"
            if self.embedding
            else f"{PREFIX}{self.name}.lora_B.weight"
        )


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _suffix(module: str) -> str:
    return module.rpartition(".")[2]


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; among equally frequent ones, the largest."""
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True)
class PeftAdapter:
    """What an adapter folder holds, known before any tensor is computed."""

    base_model: str
    """``base_model_name_or_path``: the base's Hub id or folder, as the user named it."""
    modules: tuple[LoraModule, ...]
    dtype: torch.dtype
    """The dtype of every factor."""
    saved: tuple[PlannedTensor, ...] = ()
    """Tensors of the base stored whole (``modules_to_save``), under their base names."""
    base_modules: Collection[str] = ()
    """Every module path of the base that holds a weight, for :meth:`target_modules` (empty:
    full paths only)."""
    base_revision: str | None = None
    """The base's commit, when it came from the Hub (PEFT's ``revision``)."""
    task_type: str | None = "CAUSAL_LM"
    use_rslora: bool = False
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ValueError("internal error: a module is adapted twice")
        if not self.modules:
            raise ValueError("internal error: an adapter needs at least one LoRA module")
        overlap = set(names) & {_module_of(t.name) for t in self.saved}
        if overlap:
            raise ValueError(
                f"internal error: {sorted(overlap)[0]} is both adapted and saved whole"
            )

    def write_order(self) -> list[LoraModule | PlannedTensor]:
        """The modules and the saved tensors in the order the file holds them, which
        :class:`PeftAdapterWriter` takes them in: the checkpoint's own (embeddings, the layers
        in order, the rest), so that a writer reading the checkpoint in this order is done
        with each of its files in turn."""
        entries: list[LoraModule | PlannedTensor] = [*self.modules, *self.saved]
        return sorted(
            entries,
            key=lambda e: sort_key(e.name + ".weight" if isinstance(e, LoraModule) else e.name),
        )

    def planned(self) -> list[PlannedTensor]:
        """The file's tensors in writing order: a module's A then its B; a saved tensor."""
        tensors = []
        for entry in self.write_order():
            if isinstance(entry, LoraModule):
                tensors.append(PlannedTensor(entry.down_name, entry.down_shape, self.dtype))
                tensors.append(PlannedTensor(entry.up_name, entry.up_shape, self.dtype))
            else:
                tensors.append(PlannedTensor(PREFIX + entry.name, entry.shape, entry.dtype))
        return tensors

    def target_modules(self) -> list[str]:
        """A short name (``q_proj``) where the modules adapted are every module of that name
        in the base, else their full paths (PEFT matches an entry to a module's path or to
        its end after a dot, so both stay exact)."""
        by_suffix: dict[str, set[str]] = {}
        for module in self.modules:
            by_suffix.setdefault(_suffix(module.name), set()).add(module.name)
        targets = []
        for suffix, adapted in by_suffix.items():
            in_base = {name for name in self.base_modules if _suffix(name) == suffix}
            targets += [suffix] if in_base == adapted else sorted(adapted)
        return sorted(targets)

    def config(self) -> dict[str, Any]:
        """``adapter_config.json``: ``r`` and ``lora_alpha`` the most common values, with
        ``rank_pattern``/``alpha_pattern`` (full module paths) for the modules that differ."""
        rank = _most_common(m.rank for m in self.modules)
        alpha = _most_common(m.alpha for m in self.modules)
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.base_model,
            "revision": self.base_revision,
            "task_type": self.task_type,
            "r": rank,
            "lora_alpha": _number(alpha),
            "target_modules": self.target_modules(),
            "rank_pattern": {m.name: m.rank for m in self.modules if m.rank != rank},
            "alpha_pattern": {m.name: _number(m.alpha) for m in self.modules if m.alpha != alpha},
            "modules_to_save": sorted({_module_of(t.name) for t in self.saved}) or None,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_dora": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
        }

    def scale(self, module: LoraModule) -> float:
        """What PEFT multiplies ``B @ A`` by for this module."""
        return module.alpha / (math.sqrt(module.rank) if self.use_rslora else module.rank)


def adapter_card(body: str, base_model: str | None, tags: Iterable[str] = ()) -> str:
    """A card: front matter with ``library_name: peft``, ``base_model`` (a Hub id; None for a
    local folder, which the Hub could not link) with the ``adapter`` relation and the tags the
    Hub lists adapters by, then ``body`` (Markdown)."""
    data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        base_model_relation="adapter" if base_model else None,
        tags=["lora", "peft", *(["base_model:adapter:" + base_model] if base_model else []), *tags],
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


class PeftAdapterWriter:
    """Streams an adapter's tensors, in :meth:`PeftAdapter.write_order`, into ``folder``;
    :meth:`finish` adds the config and the card. Cast to the adapter's dtype as written."""

    def __init__(self, folder: Path, adapter: PeftAdapter, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.adapter = adapter
        planned = adapter.planned()
        size = sum(t.nbytes for t in planned) + 1  # PEFT reads one file, never shards
        self._writer = ShardedWriter(
            folder, planned, size, WEIGHTS_NAME.removesuffix(".safetensors"), metadata
        )

    def write_module(self, module: LoraModule, up: torch.Tensor, down: torch.Tensor) -> None:
        self._writer.write(module.down_name, down.to(self.adapter.dtype))
        self._writer.write(module.up_name, up.to(self.adapter.dtype))

    def write_saved(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(PREFIX + name, tensor)

    def finish(self, card: str) -> None:
        """Close the weights and write ``adapter_config.json`` and ``README.md`` (``card``:
        the whole card, front matter included; see :func:`adapter_card`)."""
        self._writer.finish()
        config = json.dumps(self.adapter.config(), indent=2, sort_keys=True)
        (self.folder / CONFIG_NAME).write_text(config + "\n")
        (self.folder / "README.md").write_text(card, encoding="utf-8")

    def close(self) -> None:
        self._writer.close()
