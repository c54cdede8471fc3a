"""Running an adapter output: each module's factors read from every adapter that targets it,
combined (:mod:`merge_engine.methods.adapter_combination`) and written, one module at a
time, so memory holds one module's factors; then the config, the card and the recipe."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from merge_engine.methods.adapter_combination import (
    Factors,
    combine_module,
    draw_initial_weights,
    draw_masks,
)
from merge_engine.output.adapter_card import build_adapter_card
from merge_engine.output.peft_adapter import LoraModule, PeftAdapter, PeftAdapterWriter
from merge_engine.output.staging import staging_folder
from merge_engine.plan.adapter_plan import AdapterPlan, ModuleTask
from merge_engine.run.executor import RECIPE_NAME, Progress
from merge_engine.sources.formats.peft_adapter import download_adapter
from merge_engine.sources.tensors import TensorStore


def output_adapter(plan: AdapterPlan) -> PeftAdapter:
    """The folder the plan writes: every module at the combined rank with ``lora_alpha``
    equal to it (PEFT's combined adapter has a scale of 1)."""
    first = plan.adapters[0].config
    return PeftAdapter(
        base_model=str(plan.recipe.base_model),
        modules=tuple(_module(task, plan.rank) for task in plan.tasks),
        dtype=plan.dtype,
        base_modules=[name.removesuffix(".weight") for name in plan.base.tensors],
        task_type=first.get("task_type", "CAUSAL_LM"),
        fan_in_fan_out=any(t.fan_in_fan_out for t in plan.tasks if t.kind == "linear"),
    )


def _module(task: ModuleTask, rank: int) -> LoraModule:
    return LoraModule(
        name=task.module,
        up_shape=(task.out_features, rank),
        down_shape=(rank, task.in_features),
        alpha=rank,
        embedding=task.kind == "embedding",
    )


def download_adapters(
    plan: AdapterPlan, token: str | bool | None = None, cache_dir: Path | None = None
) -> None:
    """Fetch each Hub adapter's two files at the commit the pre-flight read (a local one is in
    place); the base's weights are never needed."""
    for adapter in plan.adapters:
        download_adapter(adapter, token, cache_dir)


def write_adapter_merge(
    plan: AdapterPlan,
    out_dir: str | Path,
    *,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    progress: Progress | None = None,
    card_command: str | None = None,
    card_details: dict | None = None,
) -> Path:
    """Download the adapters (Hub ones, pinned), combine them into ``out_dir`` (published
    atomically): ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` and
    the recipe. ``progress`` counts modules; ``card_details`` are further arguments of
    :func:`build_adapter_card`."""
    out_dir = Path(out_dir)
    download_adapters(plan, token, cache_dir)
    stores = [adapter.store() for adapter in plan.adapters]
    generator = torch.Generator().manual_seed(plan.seed) if plan.seed is not None else None
    states = _mask_states(plan, generator) if generator is not None else {}
    output = output_adapter(plan)
    tasks = {task.module: task for task in plan.tasks}
    with staging_folder(out_dir) as staging:
        writer = PeftAdapterWriter(staging, output)
        try:
            modules = output.write_order()  # the checkpoint's order, one module at a time
            bar = tqdm(
                modules,
                desc=f"{plan.combination.type} of adapters",
                unit="module",
                disable=not show_progress,
            )
            for done, module in enumerate(bar, start=1):
                task = tasks[module.name]
                if generator is not None:
                    generator.set_state(states[task.module])
                down, up = _combine(plan, task, stores, generator)
                writer.write_module(module, up, down)
                if progress:
                    progress(done, len(modules), task.module)
            card = build_adapter_card(
                plan, name=out_dir.name, command=card_command, **(card_details or {})
            )
            writer.finish(card)
        finally:
            writer.close()
        (staging / RECIPE_NAME).write_text(plan.reproducible_recipe().to_yaml())
    return out_dir


def _mask_states(plan: AdapterPlan, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The generator's state as PEFT reaches each module: after the new adapter's initial
    weights (replayed) and every earlier module's masks, in PEFT's module order (the plan's),
    drawn without reading any factor; the writer then takes the modules in the checkpoint's
    order, each from its own state."""
    if plan.replays_peft_draws:
        modules = [(t.kind, t.in_features, t.out_features) for t in plan.tasks]
        draw_initial_weights(generator, modules, plan.rank, plan.init_lora_weights)
    states = {}
    for task in plan.tasks:
        states[task.module] = generator.get_state()
        shapes = [
            (
                plan.adapters[i.adapter].tensors[i.down].shape,
                plan.adapters[i.adapter].tensors[i.up].shape,
            )
            for i in task.inputs
        ]
        draw_masks(
            plan.combination,
            shapes,
            plan.dtype,
            kind=task.kind,
            fan_in_fan_out=task.fan_in_fan_out,
            generator=generator,
        )
    return states


def _combine(
    plan: AdapterPlan,
    task: ModuleTask,
    stores: list[TensorStore],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    factors = [
        Factors(
            stores[i.adapter].get(i.down).to(plan.dtype),
            stores[i.adapter].get(i.up).to(plan.dtype),
            i.scaling,
        )
        for i in task.inputs
    ]
    weights = [plan.weights[i.adapter] for i in task.inputs]
    return combine_module(
        plan.combination,
        factors,
        weights,
        plan.rank,
        kind=task.kind,
        fan_in_fan_out=task.fan_in_fan_out,
        generator=generator,
    )
