"""Writing weights without ever holding a whole model: :class:`ShardedWriter` knows every
output tensor's name, shape and dtype before the first one is computed (the plan says so), so
it lays out the shards and writes each header up front, then appends each tensor's bytes as it
arrives: nothing is buffered, and memory stays bounded by the tensor being written.
:class:`ComponentWriter` does it per component folder, as diffusers lays a pipeline out.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from merge_engine.plan.merge_plan import PlannedTensor
from merge_engine.sources.tensors import SAFETENSORS_DTYPES

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def assign_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header_bytes(shard: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Streams tensors, in planned order, into shards whose headers are written first. The
    files are ``{stem}.safetensors``, or ``{stem}-00001-of-0000N.safetensors`` and their index
    ``{stem}.safetensors.index.json``; ``metadata`` goes into every header."""

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        shard_size: int,
        stem: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = folder
        self.shards = assign_shards(tensors, shard_size)
        self.stem = stem
        self.metadata = metadata
        count = len(self.shards)
        self.file_names = (
            [f"{stem}.safetensors"]
            if count == 1
            else [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._queue = [
            (shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard
        ]
        self._position = 0
        self._file: BinaryIO | None = None
        self._open_shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, planned = self._queue[self._position]
        if (
            name != planned.name
            or tuple(tensor.shape) != planned.shape
            or tensor.dtype != planned.dtype
        ):
            raise RuntimeError(
                f"internal error: wrote {name} {tuple(tensor.shape)} {tensor.dtype}, planned {planned}"
            )
        if shard_index != self._open_shard:
            self._close_file()
            self._file = open(self.folder / self.file_names[shard_index], "wb")  # noqa: SIM115 (spans write calls; closed in finish/close)
            self._file.write(_header_bytes(self.shards[shard_index], self.metadata))
            self._open_shard = shard_index
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._position += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard and write the index; refuses if a planned tensor never came."""
        self._close_file()
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            raise RuntimeError(f"internal error: the merge stopped before writing {missing}")
        if len(self.shards) > 1:
            weight_map = {
                t.name: file
                for file, shard in zip(self.file_names, self.shards, strict=True)
                for t in shard
            }
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            index_name = f"{self.stem}.safetensors.index.json"
            (self.folder / index_name).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        self._close_file()


class ComponentWriter:
    """Streams tensors named ``component/key`` into one folder of shards per component, as
    diffusers lays a pipeline out: ``unet/diffusion_pytorch_model.safetensors``,
    ``text_encoder/model.safetensors``, ..."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], shard_size: int):
        by_component: dict[str, list[PlannedTensor]] = {}
        for tensor in tensors:
            component, _, key = tensor.name.partition("/")
            by_component.setdefault(component, []).append(
                PlannedTensor(key, tensor.shape, tensor.dtype)
            )
        self.writers = {}
        for component, planned in by_component.items():
            (folder / component).mkdir(parents=True, exist_ok=True)
            stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
            self.writers[component] = ShardedWriter(folder / component, planned, shard_size, stem)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        component, _, key = name.partition("/")
        self.writers[component].write(key, tensor)

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
