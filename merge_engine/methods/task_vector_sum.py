"""The per-entry arithmetic of the task-arithmetic family, once each task vector's pruning is
decided: one function of the inputs' entries, run in blocks or compiled into one loop.

For each entry: δᵢ = θᵢ − θ₀ (or δᵢ given, where a random sparsifier made it), kept where
|δᵢ| ≥ tᵢ (TIES' magnitude threshold, if any), Dᵢ = wᵢ·δᵢ; with sign consensus the sum of
the Dᵢ whose sign agrees with sign(ΣDᵢ) (≥0 counts as +), divided (``normalize``) by the sum
of the agreeing inputs' weights (0 → 1); without it ΣDᵢ, divided by a fixed divisor if given;
then × λ and + θ₀. See docs/methods.md.

Eager, it runs block by block over flat views, so its scratch stays a few blocks whatever the
tensor's size. Compiled (``torch.compile``), the same function becomes one loop that reads each
input once and writes the output once, instead of some thirty passes over memory: about 15 to
40 times faster on a CPU. A search, which merges the same tensors hundreds of times, compiles it
once per kind of tensor; a single merge does not pay the compile (seconds). The operations
repeat eager arithmetic step for step (each sum rounded in the working dtype, in the same
order), so both give the same bits; the tests check it.
"""

from __future__ import annotations

import logging
from functools import cache

import torch

BLOCK = 1 << 18
"""Elements per block in eager mode: bounds its scratch memory whatever the tensor size."""


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype eager kernels compute a half-precision tensor's scalar arithmetic in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merged_entries(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    thresholds: list[torch.Tensor | None],
    weights: list[torch.Tensor],
    subtract_base: bool,
    consensus: bool,
    normalize: bool,
    divisor: torch.Tensor | None,
    lambda_: torch.Tensor | None,
) -> torch.Tensor:
    """The merged entries of one block (flat tensors of one shape and dtype).

    Scalars come as 0-dim tensors, rounded as eager arithmetic rounds them: ``weights`` and
    ``divisor`` (a fixed one, without consensus) in the working dtype, ``lambda_`` in the
    dtype eager code multiplies a half-precision tensor by a Python number in (float32;
    float64 for float64). None: no such step."""
    dtype = base.dtype
    deltas = []
    for tensor, threshold, weight in zip(tensors, thresholds, weights, strict=True):
        delta = tensor - base if subtract_base else tensor
        if threshold is not None:  # dropped below it (a NaN stays, to be seen)
            delta = torch.where(delta.abs() < threshold, 0, delta)
        deltas.append(delta * weight)
    if consensus:
        positive = deltas[0].clamp(min=0)
        negative = deltas[0].clamp(max=0)
        for delta in deltas[1:]:
            positive = positive + delta.clamp(min=0)
            negative = negative + delta.clamp(max=0)
        elected = (positive + negative) >= 0
        merged = torch.where(elected, positive, negative)
        if normalize:
            sign = elected.to(dtype) * 2 - 1
            total = torch.zeros_like(merged)
            for delta, weight in zip(deltas, weights, strict=True):
                total = total + ((delta * sign) > 0).to(dtype) * weight
            merged = merged / torch.where(total == 0, 1, total)
    else:
        merged = deltas[0]
        for delta in deltas[1:]:
            merged = merged + delta
        if divisor is not None:
            merged = merged / divisor
    if lambda_ is not None:
        merged = (merged.to(lambda_.dtype) * lambda_).to(dtype)
    return merged + base


class _CompiledEntries:
    """:func:`merged_entries` compiled (shapes symbolic: one compile serves every tensor size;
    torch recompiles per input count, dtype and flags). Where this machine cannot compile (no
    C++ compiler for the CPU, no Triton for the GPU) it says so once and answers None, and
    merges run eagerly, with the same results."""

    def __init__(self) -> None:
        self.function = torch.compile(
            merged_entries, dynamic=True, options={"emulate_precision_casts": True}
        )
        self.failed = False

    def __call__(self, *args: object) -> torch.Tensor | None:
        if self.failed:
            return None
        try:
            return self.function(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.failed = True
            reason = str(error).strip().splitlines()[0]
            logging.getLogger(__name__).warning(
                "torch.compile does not work here (%s); merges run eagerly, with the same results, several times slower",
                reason,
            )
            return None


@cache
def compiled_entries() -> _CompiledEntries:
    """The process's one compiled :func:`merged_entries`."""
    return _CompiledEntries()


def merged_tensor(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    thresholds: list[torch.Tensor | None],
    weight: list[float],
    *,
    subtract_base: bool,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    compiled: bool = False,
) -> torch.Tensor:
    """:func:`merged_entries` over whole tensors: in eager blocks, or in one compiled call."""
    dtype, device = base.dtype, base.device
    opmath = _opmath(dtype)
    weights = [torch.tensor(w, dtype=dtype, device=device) for w in weight]
    divisor = None
    if not consensus and normalize:
        total = torch.tensor(weight, dtype=dtype, device=device).sum()
        divisor = total if total.abs() >= 1e-8 else None
    factor = torch.tensor(lambda_, dtype=opmath, device=device) if lambda_ != 1 else None
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1)
    arguments = (subtract_base, consensus, normalize, divisor, factor)
    if compiled:  # "keep all" as a threshold too: one compiled graph whatever the densities
        every = torch.tensor(float("-inf"), device=device)
        kept = [every if t is None else t for t in thresholds]
        out = compiled_entries()(flat, flat_base, kept, weights, *arguments)
        if out is not None:
            return out.reshape(base.shape)
    out = torch.empty_like(flat_base)
    for start in range(0, out.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        out[block] = merged_entries(
            [f[block] for f in flat], flat_base[block], thresholds, weights, *arguments
        )
    return out.reshape(base.shape)
