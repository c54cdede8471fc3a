"""Models in, state dicts out: the checks and the plain operations every alignment step shares
(which spec, same shapes, permute, interpolate)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from merge_engine.align.families import transformer_spec
from merge_engine.align.spec import PermutationSpec, apply_permutation
from merge_engine.align.stack import sequential_spec
from merge_engine.errors import IncompatibleModelsError, RecipeError

StateDict = Mapping[str, torch.Tensor]
ModelLike = nn.Module | StateDict


def state_of(model: ModelLike) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    return dict(model)


def spec_for(model: nn.Module) -> PermutationSpec:
    """A transformers model's spec by its ``config.model_type``; otherwise a Linear/Conv2d stack."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return transformer_spec(config, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    return sequential_spec(model)


def resolve_spec(spec: PermutationSpec | None, *models: ModelLike) -> PermutationSpec:
    """``spec`` if given, else the spec of the first ``nn.Module`` among ``models``."""
    if spec is not None:
        return spec
    for model in models:
        if isinstance(model, nn.Module):
            return spec_for(model)
    raise RecipeError(
        "a state dict does not say its architecture; pass spec=spec_for(model) for the model it came from",
        field="spec",
    )


def check_compatible(a: StateDict, b: StateDict) -> None:
    """Refuse two state dicts that differ in tensor names or shapes, naming the first tensor."""
    for name in [*a, *(k for k in b if k not in a)]:
        if name not in a or name not in b:
            which = "model A" if name not in a else "model B"
            raise IncompatibleModelsError(
                f"{which} has no tensor {name}; both models must share one architecture"
            )
        if a[name].shape != b[name].shape:
            raise IncompatibleModelsError(
                f"{name} has shape {tuple(a[name].shape)} in model A but {tuple(b[name].shape)} "
                f"in model B; both models must share one architecture and size"
            )


def permute_model(
    model: nn.Module, perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
) -> nn.Module:
    """A copy of ``model`` with its units reordered by ``perms``; it computes the same function."""
    spec = resolve_spec(spec, model)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(state_of(model), spec, perms))
    return permuted


def interpolate(a: ModelLike, b: ModelLike, t: float = 0.5) -> dict[str, torch.Tensor]:
    """(1 − t)·A + t·B for every floating-point tensor; integer buffers (BatchNorm's
    ``num_batches_tracked``) are taken from A."""
    if not 0 <= t <= 1:
        raise RecipeError(f"t must lie in [0, 1], got {t}", field="t")
    sa, sb = state_of(a), state_of(b)
    check_compatible(sa, sb)
    return {
        k: torch.lerp(v, sb[k].to(v.dtype), t) if v.is_floating_point() else v.clone()
        for k, v in sa.items()
    }


def load_into(model: nn.Module, state: StateDict) -> nn.Module:
    """A copy of ``model`` holding ``state``."""
    out = copy.deepcopy(model)
    out.load_state_dict(dict(state))
    return out
