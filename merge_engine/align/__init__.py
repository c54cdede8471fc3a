"""Merging models trained from different initialisations: Git Re-Basin (Ainsworth et al. 2023)
aligns model B's hidden units to model A's by permutation, which leaves what B computes
unchanged; REPAIR (Jordan et al. 2023) then restores the hidden statistics the plain average
loses. In memory, on ``nn.Module``s or state dicts::

    import torch
    from torch import nn
    from merge_engine.align import interpolate, load_into, permute_model, repair, weight_matching

    def mlp():
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    torch.manual_seed(0)
    model_a, model_b = mlp(), mlp()
    perms, report = weight_matching(model_a, model_b)        # no data needed
    aligned_b = permute_model(model_b, perms)                 # computes what model_b computed
    merged = load_into(model_a, interpolate(model_a, aligned_b, t=0.5))
    merged = repair(merged, model_a, aligned_b, [torch.randn(64, 8)], t=0.5)  # data: REPAIR

``activation_matching(model_a, model_b, batches)`` aligns from data instead. Specs come from
:func:`spec_for`: Linear/Conv2d stacks, and transformers models whose ``model_type`` is llama,
mistral, qwen2, gpt2 or bert; any other layout takes a :class:`PermutationSpec` by hand.
``save_permutations``/``load_permutations`` keep an alignment for inspection and reuse.

A recipe's ``align`` step is :mod:`merge_engine.align.step`: which models are permuted to match
which (planned in the pre-flight), run before the merge, and the permuted stores the executor
reads.
"""

from __future__ import annotations

from merge_engine.align.activation_matching import activation_matching
from merge_engine.align.families import FAMILIES, transformer_spec
from merge_engine.align.io import load_permutations, save_permutations
from merge_engine.align.models import interpolate, load_into, permute_model, spec_for
from merge_engine.align.repair import repair, reset_batchnorm
from merge_engine.align.result import Alignment, MatchReport
from merge_engine.align.spec import (
    Axis,
    Group,
    Permutations,
    PermutationSpec,
    Probe,
    apply_permutation,
    invert,
    random_permutations,
    unapply_permutation,
)
from merge_engine.align.stack import sequential_spec
from merge_engine.align.weight_matching import weight_matching

__all__ = [
    "FAMILIES",
    "Alignment",
    "Axis",
    "Group",
    "MatchReport",
    "PermutationSpec",
    "Permutations",
    "Probe",
    "activation_matching",
    "apply_permutation",
    "interpolate",
    "invert",
    "load_into",
    "load_permutations",
    "permute_model",
    "random_permutations",
    "repair",
    "reset_batchnorm",
    "save_permutations",
    "sequential_spec",
    "spec_for",
    "transformer_spec",
    "unapply_permutation",
    "weight_matching",
]
