"""Permutation specs: which hidden units of a network may be reordered without changing what it
computes, and which axis of which tensor each reordering touches.

A *group* is one set of interchangeable units: the hidden units of a layer, or the attention
heads of a block. A permutation of a group is a long tensor ``perm`` of its size; applying it
puts old unit ``perm[i]`` at position ``i`` along every axis the group touches (``W[perm]``).

An :class:`Axis` says how a tensor's axis is laid out in units of its group:

- ``unit``: contiguous elements per unit (``head_dim`` for a head; ``H*W`` for the channels of
  a flattened feature map; 1 for a hidden unit);
- ``shared``: the axis holds one slot per block of ``Group.share`` units (a key/value head
  read by ``share`` query heads under grouped-query attention);
- ``repeat``: the axis is ``repeat`` segments laid end to end, each permuted the same way
  (GPT-2's fused ``c_attn``: query, key and value).

A group with ``share > 1`` only admits permutations that move whole blocks: the query heads of
one key/value head stay together (in any order among themselves) and follow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError

Permutations = dict[str, torch.Tensor]
"""Group name -> long tensor: new position i holds old unit perm[i]."""


class Axis(NamedTuple):
    group: str
    unit: int = 1
    shared: bool = False
    repeat: int = 1


class Group(NamedTuple):
    size: int
    share: int = 1


class Probe(NamedTuple):
    """Where a group's activations can be read for activation matching: the output (or, with
    ``input=True``, the input) of module ``module``, units along ``dim``, ``unit`` features each."""

    module: str
    input: bool = False
    dim: int = -1
    unit: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Groups, and for every tensor of the state dict one entry per axis (``None``: fixed)."""

    groups: dict[str, Group]
    axes: dict[str, tuple[Axis | None, ...]]
    probes: dict[str, Probe] = field(default_factory=dict)
    family: str = "custom"

    def touching(self) -> dict[str, list[tuple[str, int, Axis]]]:
        """Group -> every (tensor, dim, axis) it permutes, in tensor order."""
        found: dict[str, list[tuple[str, int, Axis]]] = {g: [] for g in self.groups}
        for name, axes in self.axes.items():
            for dim, axis in enumerate(axes):
                if axis is not None:
                    found[axis.group].append((name, dim, axis))
        return found

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], what: str = "the model") -> None:
        """Refuse a state dict whose tensors or axis lengths do not fit this spec."""
        missing = sorted(set(self.axes) - set(shapes))
        extra = sorted(set(shapes) - set(self.axes))
        if missing or extra:
            name = (missing or extra)[0]
            where = "has no tensor" if missing else "has a tensor the permutation spec lacks:"
            raise IncompatibleModelsError(
                f"{what} {where} {name}; build the spec from the same architecture "
                f"(spec_for(model)) so that it names every tensor"
            )
        for name, axes in self.axes.items():
            shape = tuple(shapes[name])
            if len(axes) != len(shape):
                raise IncompatibleModelsError(
                    f"{name} in {what} has {len(shape)} axes but the spec lists {len(axes)}; "
                    f"build the spec from this model"
                )
            for dim, axis in enumerate(axes):
                if axis is not None and shape[dim] != axis_length(self.groups[axis.group], axis):
                    raise IncompatibleModelsError(
                        f"axis {dim} of {name} in {what} has length {shape[dim]} but group "
                        f"{axis.group} needs {axis_length(self.groups[axis.group], axis)}; build "
                        f"the spec from this model"
                    )


def axis_length(group: Group, axis: Axis) -> int:
    slots = group.size // group.share if axis.shared else group.size
    return axis.repeat * slots * axis.unit


def block_permutation(perm: torch.Tensor, share: int) -> torch.Tensor:
    """The permutation of blocks (key/value heads) that a block-respecting ``perm`` induces."""
    return perm[::share] // share


def axis_index(group: Group, axis: Axis, perm: torch.Tensor) -> torch.Tensor:
    """The index along the whole axis that applies ``perm`` (``tensor.index_select(dim, ·)``)."""
    slots = block_permutation(perm, group.share) if axis.shared else perm
    # (slots, unit): every element of a unit moves with it
    index = (slots[:, None] * axis.unit + torch.arange(axis.unit)).reshape(-1)
    segment = slots.numel() * axis.unit
    return torch.cat([index + r * segment for r in range(axis.repeat)])


def identity(spec: PermutationSpec) -> Permutations:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


def random_permutations(spec: PermutationSpec, seed: int = 0) -> Permutations:
    """A random permutation of every group (grouped heads moving as whole key/value blocks):
    a permuted copy of a model is the simplest pair of models in different bases."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for name, group in spec.groups.items():
        blocks = torch.randperm(group.size // group.share, generator=g)
        perms[name] = torch.cat(
            [b * group.share + torch.randperm(group.share, generator=g) for b in blocks]
        )
    return perms


def invert(perms: Permutations) -> Permutations:
    return {name: torch.argsort(p) for name, p in perms.items()}


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Refuse permutations that do not match the spec's groups or break a block constraint."""
    missing = sorted(set(spec.groups) - set(perms))
    extra = sorted(set(perms) - set(spec.groups))
    if missing or extra:
        name = (missing or extra)[0]
        state = "is missing" if missing else "is not a group of this spec"
        raise RecipeError(
            f"the permutation of group {name} {state}; use permutations computed for this model",
            field="permutations",
        )
    for name, group in spec.groups.items():
        perm = perms[name]
        if perm.dim() != 1 or perm.numel() != group.size:
            raise RecipeError(
                f"group {name} has {group.size} units but its permutation has shape "
                f"{tuple(perm.shape)}; use permutations computed for this model",
                field="permutations",
            )
        if not torch.equal(torch.sort(perm.long()).values, torch.arange(group.size)):
            raise RecipeError(
                f"the permutation of group {name} is not a permutation of 0..{group.size - 1}; "
                f"use permutations computed for this model",
                field="permutations",
            )
        if group.share > 1:
            blocks = perm.long().reshape(-1, group.share) // group.share
            if not bool((blocks == blocks[:, :1]).all()):
                raise RecipeError(
                    f"the permutation of group {name} splits a block of {group.share} query heads "
                    f"that share a key/value head; move whole blocks",
                    field="permutations",
                )


def apply_permutation(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with every permuted axis reordered; fixed tensors are shared, not copied."""
    spec.check_shapes({k: tuple(v.shape) for k, v in state.items()})
    check_permutations(spec, perms)
    return {name: permute_tensor(spec, name, tensor, perms) for name, tensor in state.items()}


def permute_tensor(
    spec: PermutationSpec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """One tensor of the state dict with its permuted axes reordered (what a streaming merge
    applies to each tensor it reads); a fixed tensor comes back as it is."""
    for dim, axis in enumerate(spec.axes.get(name, ())):
        if axis is not None:
            index = axis_index(spec.groups[axis.group], axis, perms[axis.group].long())
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


def unapply_permutation(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`apply_permutation` with the same ``perms``."""
    return apply_permutation(state, spec, invert({k: v.long() for k, v in perms.items()}))
