"""Writing a Stable Diffusion LoRA as one kohya-format safetensors file, the form sd-scripts, the
WebUI, ComfyUI and diffusers' ``load_lora_weights`` all read: per module
``<name>.alpha`` (a float32 scalar), ``<name>.lora_down.weight`` and ``<name>.lora_up.weight``,
``name`` as sd-scripts writes it (:func:`merge_engine.sources.formats.kohya_lora.kohya_name`).

The file is ``pytorch_lora_weights.safetensors`` (the name ``load_lora_weights`` looks for in a
folder or a Hub repo) in a new output folder, staged and renamed into place when complete; its
header, written first, carries ``metadata`` (the recipe that made it) beside sd-scripts' own
``ss_network_module``, ``ss_network_dim`` and ``ss_network_alpha``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from merge_engine.output.shards import ShardedWriter
from merge_engine.output.staging import staging_folder
from merge_engine.plan.merge_plan import PlannedModule, PlannedTensor

LORA_FILE = "pytorch_lora_weights.safetensors"
_ONE_FILE = 1 << 62  # a LoRA is written as one file, however large


def _planned(modules: Sequence[PlannedModule], dtype: torch.dtype) -> list[PlannedTensor]:
    tensors = []
    for m in modules:
        tensors += [
            PlannedTensor(f"{m.name}.alpha", (), torch.float32),
            PlannedTensor(f"{m.name}.lora_down.weight", m.down_shape, dtype),
            PlannedTensor(f"{m.name}.lora_up.weight", m.up_shape, dtype),
        ]
    return tensors


def write_kohya_lora(
    out_dir: Path,
    modules: Sequence[PlannedModule],
    factors: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> Path:
    """Write ``modules`` in order, each from the next ``(down, up)`` of ``factors`` (computed as
    the writer asks for them: one module in memory at a time), whose product ``up @ down`` is the
    module's whole update, into ``out_dir/pytorch_lora_weights.safetensors``; returns its path.

    Every module gets one alpha, the largest rank, its up scaled by ``rank / alpha`` so that
    ``alpha / rank * up @ down`` stays the update: diffusers mis-assigns alphas that differ
    between attention modules, so a file with one alpha loads right everywhere."""
    alpha = max((m.rank for m in modules), default=1)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(alpha),
        "ss_network_alpha": str(alpha),
        **metadata,
    }
    out_dir = Path(out_dir)
    with staging_folder(out_dir) as staging:
        stem = LORA_FILE.removesuffix(".safetensors")
        writer = ShardedWriter(staging, _planned(modules, dtype), _ONE_FILE, stem, header)
        try:
            for module, (down, up) in zip(modules, factors, strict=True):
                up = up.float() * (module.rank / alpha)
                writer.write(f"{module.name}.alpha", torch.tensor(float(alpha)))
                writer.write(f"{module.name}.lora_down.weight", down.to(dtype).contiguous())
                writer.write(f"{module.name}.lora_up.weight", up.to(dtype).contiguous())
            writer.finish()
        finally:
            writer.close()
    return out_dir / LORA_FILE
