"""Low-rank adapters applied to a base model's tensors while they stream: :class:`AdaptedStore`
hands out each base tensor plus its adapters' deltas (or a tensor an adapter replaces), one
tensor at a time, so applying an adapter never holds more than the tensor being read.

The arithmetic is PEFT's ``get_delta_weight`` followed by ``merge`` as ``merge_and_unload``
runs it on a model loaded with ``PeftModel.from_pretrained`` (whose adapter weights are upcast
to float32): ``B @ A`` in float32 (a convolution of the two for a conv kernel larger than 1x1),
transposed for ``fan_in_fan_out`` layers, times the scale, added to the weight in float32 and
rounded once to the weight's dtype (an embedding's delta is rounded to the weight's dtype
first, as PEFT's ``Embedding.merge`` does). Diffusers' ``fuse_lora(lora_scale=s)`` goes through the
same PEFT layers with the scale multiplied by ``s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merge_engine.sources.tensors import TensorStore

_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@dataclass(frozen=True)
class LowRankDelta:
    """One adapter's update of one tensor: scale * up @ down (conv kernels: as PEFT/kohya do)."""

    store: TensorStore
    """Where the adapter's tensors are read."""
    up: str
    """Name of B / lora_up in that store: (out, r) or (out, r, 1, 1)."""
    down: str
    """Name of A / lora_down: (r, in) or (r, in, kh, kw)."""
    scale: float
    """alpha / r (or alpha / sqrt(r) for rsLoRA) times any strength."""
    fan_in_fan_out: bool = False
    """The base stores the weight as (in, out) (GPT-2's Conv1D, an embedding): the delta is
    transposed."""
    rounded_first: bool = False
    """The delta is rounded to the weight's dtype before it is added, as PEFT merges an
    embedding's adapter; otherwise it is added in float32 and the sum rounded once."""

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update of a base tensor of ``shape``, computed in float32, returned in ``dtype``."""
        up = self.store.get(self.up).float()
        down = self.store.get(self.down).float()
        if len(shape) <= 2:
            product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            if self.fan_in_fan_out:
                product = product.T
        elif all(size == 1 for size in shape[2:]):  # a 1x1 convolution: a matrix product
            product = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        else:  # a kxk kernel: the composition of the two convolutions
            product = _CONVOLUTIONS[len(shape)](down.transpose(0, 1), up).transpose(0, 1)
        product = product.mul_(self.scale).reshape(shape)
        return product.to(dtype)


class AdaptedStore:
    """A base store whose tensors come out with their adapters applied: each named tensor (or
    the tensor an adapter replaces it with, PEFT's ``modules_to_save``, in the base's dtype as
    PEFT loads it) plus every delta listed for it, in order (each addition rounded to the
    base's dtype, as PEFT merging adapters one after another does). Names with neither come
    out of the base unchanged."""

    def __init__(
        self,
        base: TensorStore,
        deltas: Mapping[str, Sequence[LowRankDelta]],
        replaced: Mapping[str, tuple[TensorStore, str]] | None = None,
    ):
        self.base = base
        self.deltas = deltas
        self.replaced = replaced or {}

    def get(self, name: str) -> torch.Tensor:
        tensor = self.base.get(name)
        if name in self.replaced:
            store, key = self.replaced[name]
            tensor = store.get(key).to(tensor.dtype)
        for delta in self.deltas.get(name, ()):
            shape = tuple(tensor.shape)
            if delta.rounded_first:
                tensor = tensor + delta.delta(shape, tensor.dtype)
            else:
                tensor = (tensor.float() + delta.delta(shape)).to(tensor.dtype)
        return tensor

    def release(self, file: str) -> None:
        """Release ``file`` of the base and the adapters' open files (they reopen on the next
        read; an adapter is small beside its base, and its tensors are read as they come)."""
        self.base.release(file)
        for store in self._adapter_stores():
            for adapter_file in _files_of(store):
                store.release(adapter_file)

    def _adapter_stores(self) -> list[TensorStore]:
        stores = [delta.store for deltas in self.deltas.values() for delta in deltas]
        stores += [store for store, _ in self.replaced.values()]
        unique: dict[int, TensorStore] = {id(store): store for store in stores}
        return list(unique.values())


def _files_of(store: TensorStore) -> set[str]:
    """The files a store reads (none for a store in memory)."""
    tensors = getattr(store, "tensors", {})
    return {getattr(info, "file", "") for info in tensors.values()} - {""}
