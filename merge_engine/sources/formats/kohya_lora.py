"""Stable Diffusion LoRA files (kohya/A1111 and diffusers/PEFT names) and the checkpoint tensor
each of their modules changes, in either checkpoint layout, from names and shapes alone.

A LoRA file is one safetensors state dict. Each module it changes is named in one of these ways:

* kohya/A1111 (sd-scripts, the WebUI, ComfyUI): ``lora_unet_<path>``, ``lora_te_<path>`` (SD1.5's
  text encoder), ``lora_te1_``/``lora_te2_`` (SDXL's two), the module's path with its dots turned
  into underscores, holding ``.lora_down.weight`` (``[r, in]``, or ``[r, in, kh, kw]`` for a
  convolution), ``.lora_up.weight`` (``[out, r]`` or ``[out, r, 1, 1]``) and ``.alpha``. The UNet
  path is the diffusers one (``down_blocks_0_attentions_0_…``: sd-scripts on SD1.5) or the LDM one
  (``input_blocks_4_1_…``: sd-scripts on SDXL, and other trainers); the text encoders' are the
  transformers CLIP paths (``text_model_encoder_layers_0_self_attn_q_proj``), for SDXL's OpenCLIP
  too.
* diffusers/PEFT (``save_lora_weights``): ``unet.<path>.lora_A.weight``/``.lora_B.weight``,
  ``text_encoder.…``, ``text_encoder_2.…``; older diffusers files ``….lora.down.weight``/``.up``,
  ``….lora_linear_layer.down.weight``, ``attn1.processor.to_q_lora.down.weight``; an ``.alpha``
  beside them when the file has one.

The delta of a module is ``alpha / r * up @ down`` (convolutions as PEFT and kohya compute them),
``alpha`` defaulting to ``r``. LyCORIS's other network types (LoHa, LoKr, IA3, DoRA, GLoRA, OFT,
full differences, LoCon's CP decomposition) are refused by name.

:func:`lora_targets` maps each module to the checkpoint tensor it changes through
:mod:`merge_engine.sources.formats.sd_names` (never a second name table): a UNet module by its
diffusers or its LDM path, a text-encoder module by its transformers path. In a single-file
SDXL checkpoint OpenCLIP's q, k and v are rows of one ``in_proj_weight``: such a target says
which rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from merge_engine.errors import IncompatibleModelsError, SourceError, excerpt
from merge_engine.sources.formats.blocks import block_of, single_file_names
from merge_engine.sources.formats.layouts import Layout
from merge_engine.sources.formats.sd_names import convert_names

Shape = tuple[int, ...]
_UNET = "model.diffusion_model."
Component = Literal["unet", "text_encoder", "text_encoder_2"]

KOHYA_PREFIXES: dict[str, Component] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
"""kohya's module prefixes and the component each names."""
DIFFUSERS_PREFIXES: dict[str, Component] = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}

# (down, up) suffixes of one module's two matrices, kohya's first.
_PAIRS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),  # attn1.processor.to_q_lora.down.weight
)
_ALPHA = ".alpha"

# What a tensor name ends in, for the network types mergebot does not bake, as users know them.
_UNSUPPORTED = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), "LoKr (LyCORIS)"),
    (re.compile(r"(\.|_)dora_scale$|\.lora_magnitude_vector(\.weight)?$"), "DoRA"),
    (re.compile(r"\.on_input$"), "IA3 (LyCORIS)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA (LyCORIS)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R\.weight|boft_R)$"), "OFT/BOFT"),
    (re.compile(r"\.diff(_b)?$"), "a full weight difference (LyCORIS 'full')"),
    (re.compile(r"\.(w_norm|b_norm)$"), "a LyCORIS norm-layer network"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with CP decomposition (lora_mid, LyCORIS)"),
    (re.compile(r"^bundle_emb\."), "a LoRA bundled with textual-inversion embeddings"),
)


@dataclass(frozen=True)
class LoraModule:
    """One module a LoRA file changes: where its matrices are in the file, and their shapes."""

    name: str  # as the file names the module: lora_unet_…_to_q, unet.down_blocks.….to_q
    component: Component
    path: str  # the module's path in its component, with "_" for ".": what names are matched on
    down: str  # the file's tensor names
    up: str
    alpha: str | None  # None: alpha is the rank (scale 1)
    down_shape: Shape
    up_shape: Shape

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    def weight_shape(self) -> Shape:
        """The shape of the weight this module changes: ``[out, in]`` or ``[out, in, kh, kw]``."""
        return (self.up_shape[0], *self.down_shape[1:])


def _component(name: str) -> tuple[Component, str] | None:
    for prefixes in (KOHYA_PREFIXES, DIFFUSERS_PREFIXES):
        for prefix, component in prefixes.items():
            if name.startswith(prefix):
                return component, name[len(prefix) :]
    if name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):  # old unet-only files
        return "unet", name
    return None


def _match_path(component: Component, path: str) -> str:
    """A module's path as names are matched: dots as underscores, text encoders without their
    ``text_model`` head (transformers names CLIP's modules with it or without it)."""
    path = path.replace(".", "_")
    if component != "unet":
        path = path.removeprefix("text_model_")
    return path


def unsupported_type(names: list[str]) -> str | None:
    """The network type a LoRA file holds when it is one mergebot does not bake."""
    for name in names:
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(name):
                return kind
    return None


def read_lora_modules(shapes: Mapping[str, Shape], origin: str) -> list[LoraModule]:
    """The modules of a LoRA file, from its tensor names and shapes; anything that is not a
    plain LoRA (kohya or diffusers names) is refused naming what it is."""
    kind = unsupported_type(list(shapes))
    if kind is not None:
        raise SourceError(
            f"{origin} is {kind}, which mergebot does not bake; it bakes plain LoRA and LoCon "
            "files (lora_down/lora_up or lora_A/lora_B): convert it to a LoRA, or merge it in the WebUI"
        )
    modules: list[LoraModule] = []
    used: set[str] = set()
    for down, down_shape in sorted(shapes.items()):
        pair = next(((d, u) for d, u in _PAIRS if down.endswith(d)), None)
        if pair is None:
            continue
        name = down[: -len(pair[0])]
        up = name + pair[1]
        found = _component(name)
        if up not in shapes or found is None:
            what = f"no {pair[1]} beside it" if up not in shapes else "no component it names"
            raise SourceError(
                f"{origin} has {excerpt(down)} with {what}; it is not a Stable Diffusion LoRA "
                "in kohya or diffusers names"
            )
        alpha = name + _ALPHA if name + _ALPHA in shapes else None
        up_shape = tuple(shapes[up])
        _check_matrices(origin, name, tuple(down_shape), up_shape)
        component, path = found
        if pair[0] == "_lora.down.weight":  # attn1.processor.to_out_lora: module attn1.to_out.0
            path = path.replace(".processor.", ".")
            path += ".0" if path.endswith(".to_out") else ""
        modules.append(
            LoraModule(
                name,
                component,
                _match_path(component, path),
                down,
                up,
                alpha,
                tuple(down_shape),
                up_shape,
            )
        )
        used |= {down, up, alpha or ""}
    left = sorted(set(shapes) - used)
    if left or not modules:
        example = f" (e.g. {excerpt(left[0])})" if left else ""
        raise SourceError(
            f"{origin} is not a Stable Diffusion LoRA mergebot can read{example}; it reads kohya "
            "(lora_unet_…lora_down.weight) and diffusers (unet.….lora_A.weight) LoRA files"
        )
    return modules


def _check_matrices(origin: str, name: str, down: Shape, up: Shape) -> None:
    ranks_agree = len(down) in (2, 4) and len(up) == len(down) and up[1] == down[0]
    if not ranks_agree or (len(up) == 4 and up[2:] != (1, 1)):
        raise SourceError(
            f"{origin}'s module {excerpt(name)} has a down matrix of shape {list(down)} and an up "
            f"matrix of shape {list(up)}, which are no LoRA pair; re-save the LoRA"
        )


# --- the checkpoint's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTarget:
    """A module of a LoRA file and the checkpoint tensor it changes."""

    module: LoraModule
    tensor: str  # the checkpoint's name
    rows: tuple[int, int] | None  # the rows of ``tensor`` it changes; None: all of it
    block: str  # the block (BASE, IN00 …) block strengths name it by
    kohya_name: str  # the module as sd-scripts names it for this family (what mergebot writes)


@dataclass(frozen=True)
class ModulePlace:
    """A weight of the checkpoint that a LoRA module may change, and how it is named."""

    tensor: str
    rows: tuple[int, int] | None
    shape: Shape
    single_file_name: str
    kohya_name: str


_TEXT_PREFIXES = {
    "sd1": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


def kohya_name(family: str, component: str, key: str, single_file_name: str) -> str:
    """A module's name as sd-scripts writes it: the UNet by its diffusers path for SD1.5 and its
    LDM path for SDXL (sd-scripts trains each on that UNet), a text encoder by its transformers
    path; ``key`` is the weight's diffusers key in its component."""
    if component == "unet":
        path = single_file_name.removeprefix(_UNET) if family == "sdxl" else key
        return "lora_unet_" + path.removesuffix(".weight").replace(".", "_")
    path = _match_path(component, key.removesuffix(".weight"))  # type: ignore[arg-type]
    return f"{_TEXT_PREFIXES[family][component]}text_model_{path}"


def _module_index(
    layout: Layout, shapes: Mapping[str, Shape]
) -> dict[tuple[str, str], ModulePlace]:
    """Every weight of the checkpoint's UNet and text encoders under the (component, path) its
    LoRA modules may name: the diffusers path, and for the UNet also the LDM one."""
    index: dict[tuple[str, str], ModulePlace] = {}

    def add(
        diffusers_name: str, single: str, tensor: str, rows: tuple[int, int] | None, shape: Shape
    ) -> None:
        component, _, key = diffusers_name.partition("/")
        if component not in ("unet", *_TEXT_PREFIXES[layout.family]) or not key.endswith(".weight"):
            return
        name = kohya_name(layout.family, component, key, single)
        place = ModulePlace(tensor, rows, tuple(shape), single, name)
        index[(component, _match_path(component, key.removesuffix(".weight")))] = place  # type: ignore[arg-type]
        if component == "unet":
            ldm = single.removeprefix(_UNET).removesuffix(".weight")
            index[("unet", _match_path("unet", ldm))] = place

    if layout.format == "diffusers":  # each tensor under its own name, and the UNet's LDM one
        singles = single_file_names(layout, shapes)
        for name, shape in shapes.items():
            add(name, singles.get(name, name), name, None, shape)
        return index
    renamed, _ = convert_names(layout.family, shapes, to="diffusers")
    for r in renamed:  # a diffusers name made of single-file tensors
        if r.op in ("same", "rows"):  # not the VAE's reshapes, nor a transpose
            add(r.name, r.parts[0], r.parts[0], r.rows, r.shape)
    return index


_ATTENTION_MODULES = re.compile(
    r"(down_blocks_\d+_|up_blocks_\d+_|mid_block_)attentions_\d+_(proj_in|proj_out"
    r"|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2)))"
    r"|encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
)
_CONV_MODULES = re.compile(
    r"(down_blocks_\d+_|up_blocks_\d+_|mid_block_)(resnets_\d+_(conv1|conv2|conv_shortcut"
    r"|time_emb_proj)|(downsamplers|upsamplers)_0_conv)"
)


def lora_places(
    layout: Layout, shapes: Mapping[str, Shape], conv: bool = False
) -> list[ModulePlace]:
    """The weights sd-scripts gives a LoRA module, sorted by module name: the UNet's attention
    blocks (projections, q/k/v/out, feed-forward) and the text encoders' attention and MLP;
    with ``conv``, LoCon's too (the resnets' convolutions and time projections, the up- and
    downsamplers)."""
    found: dict[str, ModulePlace] = {}
    for (component, path), place in _module_index(layout, shapes).items():
        wanted = _ATTENTION_MODULES.fullmatch(path) or (
            conv and component == "unet" and _CONV_MODULES.fullmatch(path)
        )
        if wanted:
            found[place.kohya_name] = place
    return [found[name] for name in sorted(found)]


def lora_targets(
    modules: list[LoraModule],
    layout: Layout,
    shapes: Mapping[str, Shape],
    lora_origin: str,
    model_origin: str,
) -> list[LoraTarget]:
    """The checkpoint tensor each module changes; a LoRA made for another model (a module the
    checkpoint lacks, or a weight of another shape) is refused in one sentence."""
    if any(m.component == "text_encoder_2" for m in modules) and layout.family == "sd1":
        raise IncompatibleModelsError(
            f"{lora_origin} is an SDXL LoRA (it changes a second text encoder), and "
            f"{model_origin} is {layout}; use it with an SDXL checkpoint"
        )
    index = _module_index(layout, shapes)
    targets: list[LoraTarget] = []
    seen: dict[str, str] = {}
    for module in modules:
        place = index.get((module.component, module.path))
        if place is None:
            raise IncompatibleModelsError(
                f"{lora_origin} changes {excerpt(module.name)}, which {model_origin} ({layout}) "
                f"does not have; the LoRA was made for another model ({_guess(modules)}?), pick "
                "a LoRA for this one"
            )
        weight = module.weight_shape()
        if weight != place.shape[: len(weight)] or len(weight) != len(place.shape):
            raise IncompatibleModelsError(
                f"{lora_origin} changes {excerpt(module.name)} as a {list(weight)} weight, but "
                f"that weight of {model_origin} ({layout}) is {list(place.shape)}; the LoRA was "
                f"made for another model ({_guess(modules)}?), pick a LoRA for this one"
            )
        if place.kohya_name in seen:
            raise IncompatibleModelsError(
                f"{lora_origin} changes one weight twice, as {excerpt(seen[place.kohya_name])} and "
                f"{excerpt(module.name)}; keep one of the two names in the file"
            )
        seen[place.kohya_name] = module.name
        block = block_of(layout.family, place.single_file_name)
        targets.append(LoraTarget(module, place.tensor, place.rows, block, place.kohya_name))
    return targets


def _guess(modules: list[LoraModule]) -> str:
    """Which family a LoRA was likely made for: SDXL's has a second text encoder or a
    cross-attention of width 2048; else SD1.5 (768) or SD2 (1024)."""
    if any(m.component == "text_encoder_2" for m in modules):
        return "SDXL"
    widths = {m.down_shape[1] for m in modules if m.path.endswith(("attn2_to_k", "attn2_to_v"))}
    return {2048: "SDXL", 1024: "SD2", 768: "SD1.5"}.get(next(iter(widths), 0), "another family")
