"""Reading and writing weights without ever holding a whole model.

Reading: :class:`SafetensorsStore` memory-maps the shards of a folder and hands out one tensor
at a time. Writing: :class:`ShardedWriter` knows every output tensor's name, shape and dtype
before the first one is computed (the plan says so), so it lays out the shards and writes each
header up front, then appends each tensor's bytes as it arrives: nothing is buffered, and
memory stays bounded by the tensor being written.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from safetensors import safe_open

from merge_engine.errors import SourceError, excerpt

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_NAME_CHARS = 1024
"""Longer than any real checkpoint's tensor names (a few dozen to about 150 characters)."""
INDEX_NAME = "model.safetensors.index.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    key: str | None = None
    """The tensor's name inside ``file`` when the model calls it otherwise (a diffusers
    component's tensors are named ``unet/...`` in the model, bare in the file)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_header(raw: bytes, origin: str) -> dict[str, dict]:
    try:
        header = json.loads(raw)
    except ValueError:
        raise SourceError(
            f"{origin} is not a valid safetensors file (its header is not JSON); re-download or re-save it"
        ) from None
    header.pop("__metadata__", None)
    return header


def read_header(path: Path, file: str | None = None) -> dict[str, TensorInfo]:
    """Tensor names, shapes and dtypes of one safetensors file, from its header alone;
    ``file`` is how the infos name it (its path in the model's folder; its name by default)."""
    with open(path, "rb") as f:
        size = f.read(8)
        if len(size) < 8:
            raise SourceError(
                f"{path} is not a valid safetensors file (it is {len(size)} bytes long); re-download or re-save it"
            )
        (length,) = struct.unpack("<Q", size)
        if length > MAX_HEADER_BYTES:
            raise SourceError(
                f"{path} declares a {length}-byte header, more than any real checkpoint; the file is corrupt"
            )
        header = parse_header(f.read(length), str(path))
    return tensor_infos(header, file or path.name, str(path))


def tensor_infos(header: Mapping[str, dict], file: str, origin: str) -> dict[str, TensorInfo]:
    infos = {}
    for name, entry in header.items():
        _check_tensor_name(name, origin)
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype", ""))
        if dtype is None:
            raise SourceError(
                f"tensor {name} in {origin} has dtype {excerpt(entry.get('dtype'))}, which mergebot cannot merge"
            )
        infos[name] = TensorInfo(tuple(entry["shape"]), dtype, file)
    return infos


def _check_tensor_name(name: str, origin: str) -> None:
    """A tensor name is a line of at most :data:`MAX_TENSOR_NAME_CHARS`: the name patterns
    (layers, blocks, a user's ``discard:``) then match each name in time linear in it; a name of
    many ``layers.1.`` ending in a line break made them quadratic."""
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise SourceError(
            f"{origin} has a tensor name of {len(name):,} characters, more than the "
            f"{MAX_TENSOR_NAME_CHARS:,} a checkpoint's names take; re-save it with its real names"
        )
    if not name.isprintable():
        raise SourceError(
            f"{origin} has a tensor name holding a line break or another control character "
            f"({excerpt(name)}); re-save it with its real names"
        )


class TensorStore(Protocol):
    def get(self, name: str) -> torch.Tensor: ...

    def release(self, file: str) -> None:
        """Unmap a file no later tensor needs, so its pages leave the process's memory."""


class SafetensorsStore:
    """Lazy, memory-mapped access to the tensors of a folder of safetensors shards."""

    def __init__(self, folder: Path, tensors: Mapping[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors
        self._handles: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(
                str(self.folder / info.file), framework="pt", device="cpu"
            )
        return self._handles[info.file].get_tensor(info.key or name)

    def release(self, file: str) -> None:
        self._handles.pop(file, None)


class MemoryStore:
    """A state dict seen as a store (the in-memory API)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def release(self, file: str) -> None:
        pass


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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
