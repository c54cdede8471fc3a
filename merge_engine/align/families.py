"""Specs for transformers models, keyed by ``config.model_type``.

Only what lives inside a block is permuted: the MLP's intermediate units and the attention heads
of each layer. The residual stream (embeddings, every norm, the attention and MLP output rows,
the LM head) is kept fixed: permuting it would tie every layer to one permutation, and models
from different initialisations are aligned far better per block.

Heads move as whole heads, never the dimensions inside one: rotary embeddings (Llama, Mistral,
Qwen2) rotate pairs of dimensions at fixed positions within a head, and every head's query and
key must stay paired. Under grouped-query attention a key/value head serves ``share`` query heads;
a permutation moves each such block with its key/value head (see :mod:`.spec`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from merge_engine.align.spec import Axis, Group, PermutationSpec, Probe
from merge_engine.errors import IncompatibleModelsError

Role = Literal["heads", "kv", "qkv", "units"] | None
"""heads: query heads (and o_proj's inputs); kv: key/value heads; qkv: GPT-2's fused
query|key|value axis; units: MLP intermediate units."""


class Family(NamedTuple):
    layer: str  # the name of the per-layer container: model.layers.<i>, transformer.h.<i>
    roles: dict[str, tuple[Role, ...]]  # tensor name inside a layer -> role of each axis
    mlp_probe: str  # the module whose input is the MLP's intermediate units
    attn_probe: str  # the module whose input is the concatenated head outputs


# nn.Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out].
LLAMA = Family(
    layer="layers",
    roles={
        "self_attn.q_proj.weight": ("heads", None),
        "self_attn.q_proj.bias": ("heads",),
        "self_attn.k_proj.weight": ("kv", None),
        "self_attn.k_proj.bias": ("kv",),
        "self_attn.v_proj.weight": ("kv", None),
        "self_attn.v_proj.bias": ("kv",),
        "self_attn.o_proj.weight": (None, "heads"),
        "mlp.gate_proj.weight": ("units", None),
        "mlp.gate_proj.bias": ("units",),
        "mlp.up_proj.weight": ("units", None),
        "mlp.up_proj.bias": ("units",),
        "mlp.down_proj.weight": (None, "units"),
    },
    mlp_probe="mlp.down_proj",
    attn_probe="self_attn.o_proj",
)
GPT2 = Family(
    layer="h",
    roles={
        "attn.c_attn.weight": (None, "qkv"),
        "attn.c_attn.bias": ("qkv",),
        "attn.c_proj.weight": ("heads", None),
        "mlp.c_fc.weight": (None, "units"),
        "mlp.c_fc.bias": ("units",),
        "mlp.c_proj.weight": ("units", None),
    },
    mlp_probe="mlp.c_proj",
    attn_probe="attn.c_proj",
)
BERT = Family(
    layer="layer",
    roles={
        "attention.self.query.weight": ("heads", None),
        "attention.self.query.bias": ("heads",),
        "attention.self.key.weight": ("heads", None),
        "attention.self.key.bias": ("heads",),
        "attention.self.value.weight": ("heads", None),
        "attention.self.value.bias": ("heads",),
        "attention.output.dense.weight": (None, "heads"),
        "intermediate.dense.weight": ("units", None),
        "intermediate.dense.bias": ("units",),
        "output.dense.weight": (None, "units"),
    },
    mlp_probe="output.dense",
    attn_probe="attention.output.dense",
)
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gpt2": GPT2,
    "bert": BERT,
}


def _heads(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def transformer_spec(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> PermutationSpec:
    """The spec of a transformers model from its config and its state dict's shapes (a
    safetensors header is enough: no weight is read)."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise IncompatibleModelsError(
            f"model_type {model_type!r} has no permutation spec; alignment covers "
            f"{', '.join(sorted(FAMILIES))}, or pass a PermutationSpec written by hand"
        )
    heads, kv, head_dim = _heads(config)
    if heads % kv:
        raise IncompatibleModelsError(
            f"{heads} query heads cannot share {kv} key/value heads evenly; check the config"
        )
    layer_re = re.compile(rf"^(?P<layer>(?:.*\.)?{family.layer}\.\d+)\.(?P<rest>.+)$")
    groups: dict[str, Group] = {}
    axes: dict[str, tuple[Axis | None, ...]] = {}
    probes: dict[str, Probe] = {}
    for name, shape in shapes.items():
        match = layer_re.match(name)
        roles = family.roles.get(match["rest"]) if match else None
        if roles is None:
            axes[name] = (None,) * len(shape)
            continue
        layer = match["layer"]
        heads_group, units_group = f"{layer}.attn_heads", f"{layer}.mlp_units"
        if "units" in roles:
            size = shape[roles.index("units")]
            if groups.setdefault(units_group, Group(size)).size != size:
                raise IncompatibleModelsError(
                    f"{name} has {size} intermediate units but its layer's other MLP weights "
                    f"have {groups[units_group].size}; the checkpoint is inconsistent"
                )
            probes[units_group] = Probe(f"{layer}.{family.mlp_probe}", input=True)
        else:
            groups[heads_group] = Group(heads, heads // kv)
            probes[heads_group] = Probe(f"{layer}.{family.attn_probe}", input=True, unit=head_dim)
        axes[name] = tuple(_axis(role, heads_group, units_group, head_dim) for role in roles)
    spec = PermutationSpec(dict(sorted(groups.items(), key=_layer_order)), axes, probes, model_type)
    spec.check_shapes(shapes, f"the {model_type} model")
    return spec


def _axis(role: Role, heads_group: str, units_group: str, head_dim: int) -> Axis | None:
    if role == "heads":
        return Axis(heads_group, unit=head_dim)
    if role == "kv":
        return Axis(heads_group, unit=head_dim, shared=True)
    if role == "qkv":
        return Axis(heads_group, unit=head_dim, repeat=3)
    if role == "units":
        return Axis(units_group)
    return None


def _layer_order(item: tuple[str, Group]) -> tuple:
    """Sort group names by layer number, not as strings (layers.10 after layers.9)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in item[0].split("."))
