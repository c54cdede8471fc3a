"""The names block-weighted merges give the parts of a diffusion model.

"MBW" (supermerger, sd-mecha) gives one value per UNet block, typed as one row in this order:
SD1.5 ``BASE, IN00…IN11, M00, OUT00…OUT11`` (26), SDXL ``BASE, IN00…IN08, M00, OUT00…OUT08``
(20). ``INnn`` is the UNet's ``input_blocks.nn``, ``M00`` its middle block and ``OUTnn`` its
``output_blocks.nn``; as those tools do, the time (and SDXL's label) embedding counts as
``BASE``, the UNet's final norm and convolution as the last ``OUT`` block, and everything
outside the UNet (text encoders, VAE) as ``BASE``. Filters may also name a component
(``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) or a class of UNet tensor
(``attention``, ``resnet``, ``sampler``, ``embedding``, ``io``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from merge_engine.recipe.parameters import Place
from merge_engine.sources.formats.layouts import COMPONENTS, Family, Layout, component_of

_LEVELS = {"sd1": 12, "sdxl": 9}
"""How many input (and output) blocks each family's UNet has."""

CLASSES = ("attention", "resnet", "sampler", "embedding", "io")

_UNET = "model.diffusion_model."
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.\d+\.(.+)$|^(middle_block)\.\d+\.(.+)$")
_RESNET = re.compile(r"^(in_layers|out_layers|emb_layers|skip_connection)\.")
_SAMPLER = re.compile(r"^(op|conv)\.")


def block_names(family: Family) -> tuple[str, ...]:
    count = _LEVELS[family]
    return (
        "BASE",
        *(f"IN{i:02}" for i in range(count)),
        "M00",
        *(f"OUT{i:02}" for i in range(count)),
    )


BLOCK_NAME = re.compile(r"^(BASE|M00|IN\d\d|OUT\d\d)$")
"""What looks like a block name in a filter (so a block the model lacks can be refused)."""


def describe_blocks(family: Family) -> str:
    """The block list as an error message shows it: ``BASE, IN00, …, OUT11``."""
    return ", ".join(block_names(family))


def block_of(family: Family, single_file_name: str) -> str:
    """The block a tensor belongs to, from its name in the single-file layout."""
    if not single_file_name.startswith(_UNET):
        return "BASE"
    rest = single_file_name.removeprefix(_UNET)
    match = _BLOCK.match(rest)
    if match is None:
        return (
            "BASE"
            if rest.startswith(("time_embed.", "label_emb."))
            else f"OUT{_LEVELS[family] - 1:02}"
        )
    if match[4]:
        return "M00"
    return f"{'IN' if match[1] == 'input_blocks' else 'OUT'}{int(match[2]):02}"


def class_of(single_file_name: str) -> str | None:
    """The kind of UNet tensor (attention, resnet, sampler, embedding, io); None outside the UNet."""
    if not single_file_name.startswith(_UNET):
        return None
    rest = single_file_name.removeprefix(_UNET)
    match = _BLOCK.match(rest)
    if match is None:
        return "embedding" if rest.startswith(("time_embed.", "label_emb.")) else "io"
    inner = match[3] or match[5]
    if match[1] == "input_blocks" and match[2] == "0":
        return "io"
    if _RESNET.match(inner):
        return "resnet"
    if _SAMPLER.match(inner):
        return "sampler"
    return "attention"


def labels(family: Family, name: str, single_file_name: str) -> tuple[frozenset[str], int]:
    """What filters can name for a tensor (block, component, class), and its block's index."""
    block = block_of(family, single_file_name)
    found = {block, component_of(name) or "", class_of(single_file_name) or ""} - {""}
    return frozenset(found), block_names(family).index(block)


def single_file_names(layout: Layout, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Each tensor's name in the single-file layout, which block rules are written in."""
    if layout.format == "single_file":
        return {name: name for name in shapes}
    from merge_engine.sources.formats.sd_names import convert_names

    renamed, _ = convert_names(layout.family, shapes, to="single_file")
    return {part: r.name for r in renamed for part in r.parts}


def diffusion_places(layout: Layout, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Place]:
    """Each tensor's place, sorted by name: its labels, its block, and its position in the
    block list, which a gradient interpolates over."""
    singles = single_file_names(layout, shapes)
    blocks = block_names(layout.family)
    vocabulary = frozenset((*blocks, *CLASSES, *COMPONENTS[layout.family]))
    places = {}
    for name in sorted(shapes):
        found, block = labels(layout.family, name, singles.get(name, name))
        places[name] = Place(name, block / (len(blocks) - 1), found, block, vocabulary)
    return places
