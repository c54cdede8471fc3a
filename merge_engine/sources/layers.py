"""Where the layers are in a checkpoint's tensor names, and how to renumber them.

Transformers checkpoints keep their repeated blocks under a container with a numeric index:
``model.layers.3.mlp.up_proj.weight`` (Llama, Mistral, Qwen), ``transformer.h.3.attn.c_attn.weight``
(GPT-2), ``bert.encoder.layer.3...`` (BERT), ``...blocks.3...``. Everything else is either
before the layers (embeddings) or after them (final norm, head).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_LAYER = re.compile(
    r"^(?P<prefix>(?:.+?\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_BEFORE_LAYERS = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_positions|wte|wpe|embeddings|word_embeddings|word_embeddings_layernorm)\."
)
_TIED_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|word_embeddings)\.weight$")


class LayerName(NamedTuple):
    prefix: str
    index: int
    rest: str

    def renumbered(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def split_layer(name: str) -> LayerName | None:
    match = _LAYER.match(name)
    return LayerName(match["prefix"], int(match["index"]), match["rest"]) if match else None


def is_before_layers(name: str) -> bool:
    """Embeddings come before the layers; the final norm and head after them."""
    return bool(_BEFORE_LAYERS.search(name))


def layer_counts(names: list[str] | set[str]) -> dict[str, int]:
    """Number of layers under each layer container prefix (highest index + 1)."""
    counts: dict[str, int] = {}
    for name in names:
        layer = split_layer(name)
        if layer:
            counts[layer.prefix] = max(counts.get(layer.prefix, 0), layer.index + 1)
    return counts


def is_input_embedding(name: str) -> bool:
    return bool(_INPUT_EMBEDDING.search(name)) and not split_layer(name)


def is_output_head(name: str) -> bool:
    return bool(_TIED_HEAD.search(name))


def tied_embedding(name: str, names: set[str] | dict) -> str | None:
    """For an output head missing from a model that ties it to the input embedding: that embedding."""
    if not is_output_head(name):
        return None
    return next((n for n in sorted(names) if is_input_embedding(n)), None)


def sort_key(name: str) -> tuple[int, str, int, str]:
    """Embeddings, then layers in numeric order, then everything after."""
    layer = split_layer(name)
    if layer:
        return (1, layer.prefix, layer.index, layer.rest)
    return (0 if is_before_layers(name) else 2, "", 0, name)
