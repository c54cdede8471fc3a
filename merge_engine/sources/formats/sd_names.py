"""The tensor names of Stable Diffusion checkpoints (SD1.5, SDXL) in their two layouts, and the map.

A Stable Diffusion model is stored in one of two layouts:

* ``single_file``: one state dict, named as the original LDM / sgm code (and A1111, ComfyUI)
  names it. The UNet lives under ``model.diffusion_model.`` (``input_blocks``, ``middle_block``,
  ``output_blocks``, ``time_embed``, ``out``, SDXL's ``label_emb``), the VAE under
  ``first_stage_model.`` (``encoder.down.N.block.M``, ``mid.attn_1`` with 1x1-conv q/k/v,
  ``decoder.up.N`` numbered from the bottom), SD1.5's text encoder under
  ``cond_stage_model.transformer.text_model.``, SDXL's under
  ``conditioner.embedders.0.transformer.text_model.`` (CLIP-L) and
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG: fused ``in_proj`` q/k/v, ``resblocks``,
  ``text_projection`` stored ``[hidden, proj]``).
* ``diffusers``: one folder per component (``unet``, ``vae``, ``text_encoder``,
  ``text_encoder_2``); a tensor is named ``component/key``, ``key`` as in that component's
  safetensors file.

`convert_names` turns the names and shapes of one layout into the tensors of the other: each a
`Renamed` that says which source tensors it is made of and how (the same tensor, a reshape, a
transpose, rows of a fused q/k/v, or q, k, v concatenated). Only names and shapes are read. The
tables follow diffusers' own converter (``diffusers/loaders/single_file_utils.py``); the
structure (UNet levels, resnets per level, where the attentions are, VAE levels, text-encoder
layers) is read from the names, never assumed.

Written ``text_encoder`` keys carry the ``text_model.`` prefix, as every diffusers SD repo on the
Hub does and every transformers version loads; transformers 5.6 and later save ``CLIPTextModel``
without it, so both spellings are read.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

Family = Literal["sd1", "sdxl"]
LayoutFormat = Literal["diffusers", "single_file"]
Shape = tuple[int, ...]
# A rename table: (diffusers prefix, single_file prefix) pairs; an entry ending in "." renames
# every key it starts, any other entry one whole key.
Table = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Renamed:
    """One tensor of the target layout and how it is made from source-layout tensors."""

    name: str  # in the target layout
    parts: tuple[str, ...]  # the source-layout names it is made of, in order
    op: Literal["same", "reshape", "transpose", "rows", "concat"]
    shape: tuple[int, ...]  # the target shape
    rows: tuple[int, int] | None = None  # op "rows": [start, end) of the single part's first dim

    def apply(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The target tensor from the source tensors named by ``parts`` (a view where one will do)."""
        if len(parts) != len(self.parts):
            raise ValueError(f"{self.name}: made of {len(self.parts)} tensors, got {len(parts)}")
        if self.op == "concat":
            out = torch.cat(parts, dim=0)
        elif self.op == "same":
            out = parts[0]
        elif self.op == "reshape":
            out = parts[0].reshape(self.shape)
        elif self.op == "transpose":
            out = parts[0].t()
        elif self.op == "rows":
            assert self.rows is not None
            out = parts[0][self.rows[0] : self.rows[1]]
        else:
            raise ValueError(f"{self.name}: unknown op {self.op!r}")
        if tuple(out.shape) != self.shape:
            raise ValueError(f"{self.name}: expected shape {self.shape}, got {tuple(out.shape)}")
        return out


# --- the tables ------------------------------------------------------------------------------

_UNET_TOP: Table = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
)
_UNET_RESNET: Table = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)

_VAE_TOP: Table = tuple(
    (f"{part}.{d}", f"{part}.{s}")
    for part in ("encoder", "decoder")
    for d, s in (
        ("conv_in.", "conv_in."),
        ("conv_out.", "conv_out."),
        ("conv_norm_out.", "norm_out."),
    )
) + (("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv."))
_VAE_RESNET: Table = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("conv_shortcut.", "nin_shortcut."),
)
_VAE_ATTENTION: Table = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
    # diffusers before 0.14 named them so; read, never written
    ("query.", "q."),
    ("key.", "k."),
    ("value.", "v."),
    ("proj_attn.", "proj_out."),
)
# the VAE attention's weights that are linear in diffusers, 1x1 convs in LDM (named as in LDM)
_VAE_ATTENTION_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_CONV: Table = (("conv.", "conv."),)  # up/downsamplers
_DOWNSAMPLE: Table = (("conv.", "op."),)  # the UNet's downsamplers

_CLIP_KEY = re.compile(
    r"embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)"
    r"\.(weight|bias)"
)
_OPEN_CLIP_TOP: Table = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_projection.weight", "text_projection"),  # transposed
)
_OPEN_CLIP_LAYER: Table = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_QKV = ("q", "k", "v")

# Where each component lives in a single file, per family.
_CLIP_L_PREFIX = {
    "sd1": "cond_stage_model.transformer.",
    "sdxl": "conditioner.embedders.0.transformer.",
}
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# Buffers and training state that neither layout needs, inside a component.
_DROPPED_IN_COMPONENT = re.compile(r"(.*\.)?position_ids|logit_scale|attn_mask|loss\..*")


def _rename(key: str, table: Table, to: LayoutFormat) -> str | None:
    """``key`` renamed by the first entry of ``table`` that matches it, or None."""
    for diffusers, single in table:
        src, dst = (diffusers, single) if to == "single_file" else (single, diffusers)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def _unknown(component: str, key: str) -> ValueError:
    return ValueError(f"{key!r} is not a tensor name that the {component} of an SD checkpoint has")


# --- UNet --------------------------------------------------------------------------------------
#
# LDM numbers the UNet's blocks in one sequence per side. Input block 0 is conv_in; then each
# level takes per_level + 1 numbers: its resnets (slot 0, each with its transformer in slot 1 on
# levels with attention), then its downsampler (slot 0, "op"; the last level has none but keeps
# the number). Output blocks: per_level + 1 resnets a level (transformers in slot 1), the
# upsampler in the level's last block, in slot 2 after a transformer or else slot 1. The middle
# block is resnet, transformer, resnet.


def _unet(names: Mapping[str, Shape], to: LayoutFormat) -> list[Renamed]:
    """The UNet: every tensor is the same tensor under another name."""
    rename = _unet_to_single(names) if to == "single_file" else _unet_to_diffusers(names)
    out = []
    for key, shape in names.items():
        target = _rename(key, _UNET_TOP, to) or rename(key)
        if target is None:
            raise _unknown("UNet", key)
        out.append(Renamed(target, (key,), "same", shape))
    return out


def _ints(pattern: str, names: Mapping[str, Shape]) -> list[int]:
    """The numbers that ``pattern``'s one group captures at the start of ``names``, sorted."""
    found = (re.match(pattern, key) for key in names)
    return sorted({int(m.group(1)) for m in found if m})


def _under(head: str, rest: str | None) -> str | None:
    """``head.rest``, or None when ``rest`` is None (an unknown key)."""
    return None if rest is None else f"{head}.{rest}"


def _unet_to_single(names: Mapping[str, Shape]) -> Callable[[str], str | None]:
    down = _ints(r"down_blocks\.\d+\.resnets\.(\d+)\.", names)
    up = _ints(r"up_blocks\.\d+\.resnets\.(\d+)\.", names)
    per_level = down[-1] + 1 if down else max(up, default=0)
    step = per_level + 1
    up_with_attention = set(_ints(r"up_blocks\.(\d+)\.attentions\.", names))
    block = re.compile(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
    )
    mid = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")

    def rename(key: str) -> str | None:
        if m := mid.fullmatch(key):
            kind, index, rest = m[1], int(m[2]), m[3]
            if kind == "resnets":
                return _under(
                    f"middle_block.{2 * index}", _rename(rest, _UNET_RESNET, "single_file")
                )
            return f"middle_block.{2 * index + 1}.{rest}"
        if (m := block.fullmatch(key)) is None:
            return None
        side, level, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        first = 1 + level * step if side == "down" else level * step
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return _under(f"{blocks}.{first + index}.0", _rename(rest, _UNET_RESNET, "single_file"))
        if kind == "attentions":
            return f"{blocks}.{first + index}.1.{rest}"
        if kind == "downsamplers" and side == "down":
            return _under(
                f"input_blocks.{first + per_level}.0", _rename(rest, _DOWNSAMPLE, "single_file")
            )
        if kind == "upsamplers" and side == "up":
            slot = 2 if level in up_with_attention else 1
            return _under(
                f"output_blocks.{first + per_level}.{slot}", _rename(rest, _CONV, "single_file")
            )
        return None

    return rename


def _unet_to_diffusers(names: Mapping[str, Shape]) -> Callable[[str], str | None]:
    # The first downsampler comes right after the first level's resnets, the first upsampler
    # is the first level's last output block; a one-level UNet has neither.
    downsamplers = _ints(r"input_blocks\.(\d+)\.0\.op\.", names)
    upsamplers = _ints(r"output_blocks\.(\d+)\.[12]\.conv\.", names)
    if downsamplers:
        per_level = downsamplers[0] - 1
    elif upsamplers:
        per_level = upsamplers[0]
    else:
        per_level = max(_ints(r"input_blocks\.(\d+)\.", names), default=1)
    step = per_level + 1
    block = re.compile(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.+)")
    mid = re.compile(r"middle_block\.(\d+)\.(.+)")

    def rename(key: str) -> str | None:
        if m := mid.fullmatch(key):
            number, rest = int(m[1]), m[2]
            if number % 2 == 0:
                return _under(
                    f"mid_block.resnets.{number // 2}", _rename(rest, _UNET_RESNET, "diffusers")
                )
            return f"mid_block.attentions.{number // 2}.{rest}"
        if (m := block.fullmatch(key)) is None:
            return None
        side, number, slot, rest = m[1], int(m[2]), int(m[3]), m[4]
        if side == "input":
            if number == 0:
                return None  # conv_in is in _UNET_TOP
            level, index = divmod(number - 1, step)
            if slot == 0 and rest.startswith("op."):
                return _under(
                    f"down_blocks.{level}.downsamplers.0", _rename(rest, _DOWNSAMPLE, "diffusers")
                )
            head = f"down_blocks.{level}"
        else:
            level, index = divmod(number, step)
            if slot in (1, 2) and rest.startswith("conv."):
                return f"up_blocks.{level}.upsamplers.0.{rest}"
            head = f"up_blocks.{level}"
        if slot == 0:
            return _under(f"{head}.resnets.{index}", _rename(rest, _UNET_RESNET, "diffusers"))
        return f"{head}.attentions.{index}.{rest}" if slot == 1 else None

    return rename


# --- VAE ---------------------------------------------------------------------------------------
#
# diffusers' decoder.up_blocks.i is LDM's decoder.up.{levels - 1 - i}: LDM numbers the decoder's
# levels from the bottom. Mid-block resnets r are block_{r + 1}; the attention is attn_1.


def _vae(names: Mapping[str, Shape], to: LayoutFormat) -> list[Renamed]:
    """The VAE: renames; the mid-block attention's q/k/v/proj_out are [C, C] in diffusers and
    1x1 convs [C, C, 1, 1] in LDM."""
    rename = _vae_to_single(names) if to == "single_file" else _vae_to_diffusers(names)
    out = []
    for key, shape in names.items():
        target = _rename(key, _VAE_TOP, to) or rename(key)
        if target is None:
            raise _unknown("VAE", key)
        linear = _VAE_ATTENTION_WEIGHT.search(target if to == "single_file" else key)
        if linear and to == "single_file" and len(shape) == 2:
            out.append(Renamed(target, (key,), "reshape", (*shape, 1, 1)))
        elif linear and to == "diffusers" and len(shape) > 2:
            out.append(Renamed(target, (key,), "reshape", shape[:2]))
        else:
            out.append(Renamed(target, (key,), "same", shape))
    return out


def _vae_to_single(names: Mapping[str, Shape]) -> Callable[[str], str | None]:
    levels = max(_ints(r"decoder\.up_blocks\.(\d+)\.", names), default=-1) + 1
    block = re.compile(
        r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.(.+)"
    )
    mid = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)")

    def rename(key: str) -> str | None:
        if m := mid.fullmatch(key):
            if m[3] is None:
                return _under(f"{m[1]}.mid.attn_1", _rename(m[4], _VAE_ATTENTION, "single_file"))
            return _under(
                f"{m[1]}.mid.block_{int(m[3]) + 1}", _rename(m[4], _VAE_RESNET, "single_file")
            )
        if (m := block.fullmatch(key)) is None:
            return None
        side, level, kind, rest = m[1], int(m[2]), m[3], m[4]
        if side == "decoder.up":
            level = levels - 1 - level
        if kind.startswith("resnets."):
            index = kind.split(".")[1]
            return _under(
                f"{side}.{level}.block.{index}", _rename(rest, _VAE_RESNET, "single_file")
            )
        sample = "downsample" if side == "encoder.down" else "upsample"
        return _under(f"{side}.{level}.{sample}", _rename(rest, _CONV, "single_file"))

    return rename


def _vae_to_diffusers(names: Mapping[str, Shape]) -> Callable[[str], str | None]:
    levels = max(_ints(r"decoder\.up\.(\d+)\.", names), default=-1) + 1
    block = re.compile(
        r"(encoder\.down|decoder\.up)\.(\d+)\.(block\.\d+|downsample|upsample)\.(.+)"
    )
    mid = re.compile(r"(encoder|decoder)\.mid\.(block_(\d+)|attn_1)\.(.+)")

    def rename(key: str) -> str | None:
        if m := mid.fullmatch(key):
            if m[3] is None:
                return _under(
                    f"{m[1]}.mid_block.attentions.0", _rename(m[4], _VAE_ATTENTION, "diffusers")
                )
            return _under(
                f"{m[1]}.mid_block.resnets.{int(m[3]) - 1}", _rename(m[4], _VAE_RESNET, "diffusers")
            )
        if (m := block.fullmatch(key)) is None:
            return None
        side, level, kind, rest = m[1], int(m[2]), m[3], m[4]
        if side == "decoder.up":
            level = levels - 1 - level
        if kind.startswith("block."):
            index = kind.split(".")[1]
            return _under(
                f"{side}_blocks.{level}.resnets.{index}", _rename(rest, _VAE_RESNET, "diffusers")
            )
        sampler = "downsamplers" if kind == "downsample" else "upsamplers"
        return _under(f"{side}_blocks.{level}.{sampler}.0", _rename(rest, _CONV, "diffusers"))

    return rename


# --- text encoders -----------------------------------------------------------------------------


def _clip(names: Mapping[str, Shape], to: LayoutFormat) -> list[Renamed]:
    """CLIP-L (SD1.5's text encoder, SDXL's first): the same keys, with ``text_model.`` always."""
    out = []
    for key, shape in names.items():
        rest = key.removeprefix("text_model.")
        if _CLIP_KEY.fullmatch(rest) is None:
            raise _unknown("CLIP text encoder", key)
        out.append(Renamed(f"text_model.{rest}", (key,), "same", shape))
    return out


def _open_clip(names: Mapping[str, Shape], to: LayoutFormat) -> list[Renamed]:
    """OpenCLIP bigG (SDXL's second text encoder): renames, fused q/k/v, a transposed projection."""
    out, layers = [], {}
    for key, shape in names.items():
        top = _rename(_with_text_model(key) if to == "single_file" else key, _OPEN_CLIP_TOP, to)
        if top is None:
            layers[key] = shape
        elif top.startswith("text_projection"):  # [proj, hidden] <-> [hidden, proj]
            out.append(Renamed(top, (key,), "transpose", shape[::-1]))
        else:
            out.append(Renamed(top, (key,), "same", shape))
    convert = _open_clip_layers_to_single if to == "single_file" else _open_clip_layers_to_diffusers
    return out + convert(layers)


def _with_text_model(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def _open_clip_layers_to_single(names: Mapping[str, Shape]) -> list[Renamed]:
    """Each layer: renames, and q, k, v concatenated (in that order) into in_proj."""
    out = []
    fused: dict[str, dict[str, str]] = defaultdict(dict)  # in_proj name -> q/k/v -> diffusers name
    for key, shape in names.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", _with_text_model(key))
        if m is None:
            raise _unknown("OpenCLIP text encoder", key)
        head, rest = f"transformer.resblocks.{m[1]}", m[2]
        if qkv := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            fused[f"{head}.attn.in_proj_{qkv[2]}"][qkv[1]] = key
            continue
        target = _under(head, _rename(rest, _OPEN_CLIP_LAYER, "single_file"))
        if target is None:
            raise _unknown("OpenCLIP text encoder", key)
        out.append(Renamed(target, (key,), "same", shape))
    for target, parts in fused.items():
        if sorted(parts) != sorted(_QKV):
            raise ValueError(f"{target} needs q, k and v; found only {sorted(parts)}")
        shapes = [names[parts[q]] for q in _QKV]
        rows = sum(s[0] for s in shapes)
        out.append(Renamed(target, tuple(parts[q] for q in _QKV), "concat", (rows, *shapes[0][1:])))
    return out


def _open_clip_layers_to_diffusers(names: Mapping[str, Shape]) -> list[Renamed]:
    """Each layer: renames, and in_proj split by rows into q, k, v (thirds, in that order)."""
    out = []
    for key, shape in names.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if m is None:
            raise _unknown("OpenCLIP text encoder", key)
        head, rest = f"text_model.encoder.layers.{m[1]}", m[2]
        if fused := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
            width = shape[0] // 3
            for i, q in enumerate(_QKV):
                name = f"{head}.self_attn.{q}_proj.{fused[1]}"
                rows = (i * width, (i + 1) * width)
                out.append(Renamed(name, (key,), "rows", (width, *shape[1:]), rows))
            continue
        target = _under(head, _rename(rest, _OPEN_CLIP_LAYER, "diffusers"))
        if target is None:
            raise _unknown("OpenCLIP text encoder", key)
        out.append(Renamed(target, (key,), "same", shape))
    return out


# --- the whole checkpoint ----------------------------------------------------------------------

Converter = Callable[[Mapping[str, Shape], LayoutFormat], list[Renamed]]


def _components(family: Family) -> list[tuple[str, str, Converter]]:
    """(diffusers folder, single_file prefix, converter) of each component of ``family``."""
    found: list[tuple[str, str, Converter]] = [
        ("unet", _UNET_PREFIX, _unet),
        ("vae", _VAE_PREFIX, _vae),
        ("text_encoder", _CLIP_L_PREFIX[family], _clip),
    ]
    if family == "sdxl":
        found.append(("text_encoder_2", _OPEN_CLIP_PREFIX, _open_clip))
    return found


def convert_names(
    family: Family, shapes: Mapping[str, tuple[int, ...]], to: LayoutFormat
) -> tuple[list[Renamed], list[str]]:
    """The tensors of the other layout, named as ``to`` names them.

    ``shapes`` maps the source layout's names (any subset of the components: a VAE alone works)
    to their shapes. Returns the targets sorted by name, and the source names that have no
    counterpart in ``to`` and are dropped: buffers such as ``position_ids``, OpenCLIP's
    ``logit_scale``, EMA copies (``model_ema.*``), scheduler buffers (``alphas_cumprod``), and
    anything outside the family's components (a diffusers ``safety_checker/``, say). A name inside
    a component that neither layout knows raises ValueError rather than being lost.
    """
    if family not in ("sd1", "sdxl"):
        raise ValueError(f"family must be 'sd1' or 'sdxl', not {family!r}")
    if to not in ("diffusers", "single_file"):
        raise ValueError(f"to must be 'diffusers' or 'single_file', not {to!r}")
    components = _components(family)
    grouped: dict[str, dict[str, Shape]] = defaultdict(dict)
    dropped = []
    for name, shape in shapes.items():
        for folder, prefix, _ in components:
            source_prefix = f"{folder}/" if to == "single_file" else prefix
            if name.startswith(source_prefix):
                key = name[len(source_prefix) :]
                if _DROPPED_IN_COMPONENT.fullmatch(key):
                    dropped.append(name)
                else:
                    grouped[folder][key] = tuple(shape)
                break
        else:
            dropped.append(name)

    targets: list[Renamed] = []
    for folder, prefix, convert in components:
        if not grouped[folder]:
            continue
        source, target = (f"{folder}/", prefix) if to == "single_file" else (prefix, f"{folder}/")
        for r in convert(grouped[folder], to):
            full = dataclasses.replace(
                r, name=target + r.name, parts=tuple(source + p for p in r.parts)
            )
            targets.append(full)
    targets.sort(key=lambda r: r.name)
    for before, after in zip(targets, targets[1:], strict=False):
        if before.name == after.name:
            raise ValueError(f"{before.parts} and {after.parts} both become {after.name}")
    return targets, sorted(dropped)
