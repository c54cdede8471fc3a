"""Linear assignment for one permutation group: the permutation that maximises
Σᵢ S[i, perm[i]], with the block constraint of grouped-query attention.

``scores[i, j]`` is how well unit j of model B fits position i of model A. A group whose blocks
of ``share`` units (query heads) move together with one slot (key/value head) also has
``block_scores[I, J]`` for its slots. The constrained optimum is exact and nested: for every
pair of blocks (I, J), the best matching of I's units to J's units inside them; then the best
matching of blocks, each pair worth its slot score plus its inner matching.
"""

from __future__ import annotations

import numpy as np
import torch


def _solve(scores: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import linear_sum_assignment  # only when aligning: 0.25 s to import

    rows, cols = linear_sum_assignment(scores, maximize=True)
    return cols[np.argsort(rows)], float(scores[rows, cols].sum())


def score_of(
    perm: torch.Tensor, scores: torch.Tensor, block_scores: torch.Tensor | None, share: int
) -> float:
    value = float(scores[torch.arange(perm.numel()), perm].sum())
    if block_scores is not None:
        blocks = perm[::share] // share
        value += float(block_scores[torch.arange(blocks.numel()), blocks].sum())
    return value


def best_permutation(
    scores: torch.Tensor, block_scores: torch.Tensor | None = None, share: int = 1
) -> tuple[torch.Tensor, float]:
    """(perm, its score). ``scores`` is (n, n); ``block_scores`` (n/share, n/share) or None."""
    s = scores.double().cpu().numpy()
    if share == 1:
        if block_scores is not None:
            s = s + block_scores.double().cpu().numpy()
        perm, value = _solve(s)
        return torch.from_numpy(perm).long(), value
    blocks = s.shape[0] // share
    # (I, J, share, share): the units of A's block I against those of B's block J
    tiles = s.reshape(blocks, share, blocks, share).transpose(0, 2, 1, 3)
    inner = np.empty((blocks, blocks, share), dtype=np.int64)
    worth = np.zeros((blocks, blocks))
    for i in range(blocks):
        for j in range(blocks):
            inner[i, j], worth[i, j] = _solve(tiles[i, j])
    if block_scores is not None:
        worth += block_scores.double().cpu().numpy()
    outer, value = _solve(worth)
    perm = np.concatenate([outer[i] * share + inner[i, outer[i]] for i in range(blocks)])
    return torch.from_numpy(perm).long(), value
