"""Merging models that are already in memory: ``nn.Module``s, state dicts, or references,
without writing files. The same plan and kernels as ``mergebot merge``::

    merged = merge_models([model_a, model_b], "ties", base=base_model,
                          parameters={"density": 0.5}, model_parameters=[{"weight": 1.0}, {"weight": 0.5}])
    model_a.load_state_dict(merged)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_engine.plan.planner import build_plan
from merge_engine.recipe.schema import ModelReference, parse_recipe
from merge_engine.run.executor import iter_merged, resolve_device
from merge_engine.sources.inspection import ModelSource, download, inspect_model
from merge_engine.sources.tensors import TensorInfo

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | Path


def _source(model: ModelLike, index: int, token: str | bool | None) -> ModelSource:
    if isinstance(model, (str, Path)):
        source = inspect_model(ModelReference.parse(str(model)), token)
        download(source, token)
        return source
    state = model.state_dict() if isinstance(model, nn.Module) else model
    config = (
        model.config.to_dict()
        if hasattr(model, "config") and hasattr(model.config, "to_dict")
        else {}
    )
    infos = {name: TensorInfo(tuple(t.shape), t.dtype, "memory") for name, t in state.items()}
    return ModelSource(ModelReference(f"<model {index}>"), config, infos, memory=state)


def merge_models(
    models: Sequence[ModelLike],
    method: str,
    *,
    base: ModelLike | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any] | None] | None = None,
    dtype: str | None = None,
    seed: int | None = None,
    device: str = "cpu",
    token: str | bool | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``models`` with ``method``; returns the merged state dict (on the CPU).

    ``parameters`` are the recipe's top-level parameters; ``model_parameters[i]`` those of
    ``models[i]``. Values may be scalars, gradients or filter lists, as in a YAML recipe.
    """
    sources = [_source(m, i, token) for i, m in enumerate(models)]
    base_source = _source(base, len(models), token) if base is not None else None
    per_model = list(model_parameters or [None] * len(models))
    recipe = parse_recipe(
        {
            "merge_method": method,
            "models": [
                {"model": s.ref, "parameters": p} for s, p in zip(sources, per_model, strict=True)
            ],
            "base_model": base_source.ref if base_source else None,
            "parameters": dict(parameters) if parameters else None,
            "dtype": dtype,
            "random_seed": seed,
        }
    )
    by_ref = {s.ref: s for s in [*sources, *([base_source] if base_source else [])]}
    plan = build_plan(recipe, by_ref)
    return {task.output: tensor.cpu() for task, tensor in iter_merged(plan, resolve_device(device))}


def merge_into(
    module: nn.Module, models: Sequence[ModelLike], method: str, **options: Any
) -> nn.Module:
    """Merge ``models`` and load the result into ``module`` (which may be one of them)."""
    module.load_state_dict(merge_models(models, method, **options))
    return module
