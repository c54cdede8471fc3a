"""The selection kernels give exactly what a full sort gives, on tensors large enough to take
the bracketed path, including heavily tied values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_engine.methods.sparsify import MagnitudeOrder, kth_smallest, magnitude

N = 700_000  # above the size where the bracket kicks in


@pytest.mark.parametrize("k", [1, 2, 350_000, N - 1, N])
def test_kth_smallest_matches_the_sorted_order(k):
    values = torch.randn(N, generator=torch.Generator().manual_seed(k))
    assert kth_smallest(values, k) == torch.sort(values).values[k - 1]


def test_kth_smallest_with_many_ties_and_zeros():
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 5, (N,), generator=g).float()  # five distinct values only
    values[:300_000] = 0
    ordered = torch.sort(values).values
    for k in (1, 300_000, 300_001, 500_000, N):
        assert kth_smallest(values, k) == ordered[k - 1]


def test_magnitude_keeps_the_top_k_of_a_large_tensor():
    delta = torch.randn(1000, 700, generator=torch.Generator().manual_seed(2))
    kept = magnitude(delta, 0.3)
    k = int(0.3 * delta.numel())
    reference = np.zeros(delta.numel(), bool)
    reference[np.argsort(-np.abs(delta.numpy()).ravel(), kind="stable")[:k]] = True
    assert np.array_equal(kept.numpy().ravel() != 0, reference)
    assert torch.equal(kept[kept != 0], delta[kept != 0])


@pytest.mark.parametrize("n", [1, 7, 10_001, 300_000])
def test_a_kept_magnitude_order_prunes_as_a_fresh_selection_does(n):
    """The grid of thresholds read from one sort gives every 4-decimal density the same mask as
    a selection (ties and zeros included), and any other density falls back to one."""
    g = torch.Generator().manual_seed(n)
    tensor = torch.randint(-40, 40, (n,), generator=g).float() / 8  # many ties
    order = MagnitudeOrder()
    for density in [0.0001, 0.1, 0.25, 0.3333, 0.5, 0.9999, 1 / 3, 0.123456]:
        assert torch.equal(magnitude(tensor, density, order), magnitude(tensor, density)), density
