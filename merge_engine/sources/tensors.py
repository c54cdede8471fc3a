"""Reading weights without ever holding a whole model: safetensors headers read within bounds
(size, tensor names), and the stores that hand out one tensor at a time: :class:`SafetensorsStore`
memory-maps the shards of a folder, :class:`MemoryStore` serves a model in memory,
:class:`RenamedStore` makes a tensor from another layout's. Writing is
:mod:`merge_engine.output.shards`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from merge_engine.errors import SourceError, excerpt
from merge_engine.sources.formats.sd_names import Renamed

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


class RenamedStore:
    """A store whose tensors are made from another store's by :class:`Renamed` targets."""

    def __init__(self, store: TensorStore, renames: Mapping[str, Renamed]):
        self.store = store
        self.renames = renames

    def get(self, name: str) -> torch.Tensor:
        target = self.renames[name]
        return target.apply([self.store.get(part) for part in target.parts])

    def release(self, file: str) -> None:
        self.store.release(file)
