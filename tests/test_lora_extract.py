"""Extracting a LoRA adapter from a fine-tune and its base: the truncated SVD
(``merge_engine/methods/low_rank.py``), the PEFT adapter writer and ``mergebot extract-lora``,
checked against an independent ``torch.linalg.svdvals`` and against PEFT itself."""

from __future__ import annotations

import pytest
import torch

from merge_engine.errors import RecipeError
from merge_engine.methods.low_rank import factor, rank_for_energy


def _delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 6, 3, 3), (8, 5, 1, 1)])
def test_full_rank_reconstructs_the_delta(shape):
    delta = _delta(shape)
    factors = factor(delta, rank=min(shape[0], delta[0].numel()))
    assert factors.up.shape[:2] == (shape[0], factors.rank)
    assert factors.down.shape == (factors.rank, *shape[1:])
    torch.testing.assert_close(factors.product(), delta, rtol=0, atol=2e-5)
    assert factors.relative_error < 1e-6


@pytest.mark.parametrize("split", ["balanced", "up"])
@pytest.mark.parametrize("shape", [(30, 50), (12, 4, 3, 3)])
def test_rank_r_error_is_the_dropped_singular_values(shape, split):
    """The residual's own singular values (computed independently, in float64) are the
    dropped ones: Frobenius √Σ dropped², spectral the first dropped, nuclear Σ dropped."""
    delta = _delta(shape, seed=1).double()
    rank = 5
    factors = factor(delta, rank=rank, split=split)
    everything = torch.linalg.svdvals(delta.flatten(1))
    residual = torch.linalg.svdvals((delta - factors.product()).flatten(1))
    dropped = everything[rank:]
    torch.testing.assert_close(residual[: dropped.numel()], dropped)
    assert factors.error == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-10)
    assert float(residual[0]) == pytest.approx(float(dropped[0]), rel=1e-10)
    assert float(residual.sum()) == pytest.approx(float(dropped.sum()), rel=1e-9)
    frobenius = float(torch.linalg.matrix_norm(delta.flatten(1) - factors.product().flatten(1)))
    assert factors.error == pytest.approx(frobenius, rel=1e-10)
    assert factors.relative_error == pytest.approx(frobenius / float(delta.norm()), rel=1e-10)


def test_float32_error_matches_the_float64_svd():
    delta = _delta((64, 96), seed=2)
    factors = factor(delta, rank=8)
    residual = (delta.double() - factors.product().double()).norm()
    dropped = torch.linalg.svdvals(delta.double())[8:]
    assert factors.error == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-5)
    assert float(residual) == pytest.approx(factors.error, rel=1e-5)


def test_energy_threshold_picks_the_smallest_rank_that_keeps_it():
    # Singular values 4, 3, 2, 1 (squares 16, 9, 4, 1: total 30) in random bases.
    u, _ = torch.linalg.qr(_delta((20, 4), seed=3).double())
    v, _ = torch.linalg.qr(_delta((10, 4), seed=4).double())
    delta = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    for energy, rank in [(0.5, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.9, 3), (1.0, 4)]:
        assert factor(delta, energy=energy).rank == rank, energy
    assert factor(delta, rank=2, energy=0.99).rank == 2  # the rank caps the threshold
    assert rank_for_energy(torch.zeros(5), 0.9) == 1


def test_bad_ranks_and_thresholds_are_refused_in_one_sentence():
    delta = _delta((6, 10))
    with pytest.raises(
        RecipeError,
        match=r"^rank: 7 is larger than q_proj \(6×10\) can have; ask for a rank of at most 6",
    ):
        factor(delta, rank=7, name="q_proj")
    with pytest.raises(RecipeError, match="at most 36"):
        factor(_delta((40, 4, 3, 3)), rank=37)
    with pytest.raises(RecipeError, match="^rank: 0 keeps nothing"):
        factor(delta, rank=0)
    for energy in (0, 1.5, float("nan")):
        with pytest.raises(RecipeError, match="^energy: .* is not a fraction"):
            factor(delta, energy=energy)
