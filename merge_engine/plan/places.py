"""Where each of a model's tensors sits, which gradients and block values run over: its
layer's position in the stack (0 for the first layer, 1 for the last), the embeddings before
the layers and the final norm and head after them, or a diffusion model's block."""

from __future__ import annotations

from merge_engine.recipe.parameters import Place
from merge_engine.sources import layers
from merge_engine.sources.formats.blocks import diffusion_places
from merge_engine.sources.inspection import ModelSource


def position(index: int, count: int) -> float:
    """A layer's place in its slice, for gradients: 0 for the first layer, 1 for the last."""
    return index / (count - 1) if count > 1 else 1.0


def outside_position(name: str) -> float:
    """A gradient's position for a tensor outside the layers, as mergekit places it: the
    embeddings take the first layer's value (0), the final norm and head the last layer's (1)."""
    return 0.0 if layers.is_before_layers(name) else 1.0


def tensor_places(source: ModelSource) -> dict[str, Place]:
    """Where each of a model's tensors sits, in the order the merge writes them: layers in
    order for a transformers model (gradients run over them), blocks for a diffusion model
    (gradients run over the block list)."""
    if source.layout.is_diffusion:
        return diffusion_places(source.layout, {n: i.shape for n, i in source.tensors.items()})
    names = sorted(source.tensors, key=layers.sort_key)
    counts = layers.layer_counts(names)
    places = {}
    for name in names:
        layer = layers.split_layer(name)
        t = position(layer.index, counts[layer.prefix]) if layer else outside_position(name)
        places[name] = Place(name, t)
    return places


def describe_layers(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} layers under {p}" for p, n in counts.items()) or "no layers"
