"""The pre-flight of an adapter output: LoRA adapters of one base, combined into one adapter.

From the recipe (:mod:`merge_engine.plan.adapter_recipe`), the base's config and header and
each adapter's config and header (:mod:`merge_engine.sources.formats.peft_adapter`), and
nothing else, it checks that every source is a plain LoRA adapter fitting the base, that the
ranks suit the combination type, and that an SVD rank fits every module; then it lists the
modules (for the dare types in the base's module order, the order PEFT visits them in and
draws their masks in; by name otherwise) with the adapters that target each, and the shapes
of the factors written.

Decisions where PEFT is silent or differs:
- ``base_model_name_or_path`` of an adapter that differs from the recipe's base (or from the
  other adapters') is a note, not a refusal: it is often a path on the trainer's machine, and
  what matters, the base's tensor shapes, is checked.
- An adapter that trains modules whole (``modules_to_save``) is refused: PEFT's combined
  adapter would hold fresh copies of the base's modules, not any adapter's trained ones.
- Conv LoRA modules are refused (language-model adapters have none).
- An SVD rank above a module's smaller side is refused: PEFT would write factors of a
  smaller rank than its config says, which ``from_pretrained`` cannot load.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError, SourceError
from merge_engine.methods.adapter_combination import (
    FACTOR_TYPES,
    RANDOM_TYPES,
    REPLAYED_INITS,
    SVD_TYPES,
    Combination,
    ModuleKind,
)
from merge_engine.plan.adapter_recipe import read_combination
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.formats.peft_adapter import (
    PeftAdapter,
)
from merge_engine.sources.inspection import ModelSource
from merge_engine.sources.module_order import module_order


@dataclass(frozen=True)
class ModuleInput:
    """One adapter's factors of a module: which adapter (an index into the plan's), the
    names of A and B in its file, and its scaling."""

    adapter: int
    down: str
    up: str
    scaling: float


@dataclass(frozen=True)
class ModuleTask:
    """One module of the combined adapter (its path in the base, without ``.weight``) and
    the adapters that target it, in recipe order; its factors are (rank, in) and (out, rank)."""

    module: str
    inputs: tuple[ModuleInput, ...]
    kind: ModuleKind
    in_features: int
    out_features: int
    fan_in_fan_out: bool


@dataclass
class AdapterPlan:
    """What an adapter output computes and writes; made by :func:`build_adapter_plan`."""

    recipe: Recipe
    combination: Combination
    weights: list[float]
    base: ModelSource
    adapters: list[PeftAdapter]
    tasks: list[ModuleTask]
    rank: int
    dtype: torch.dtype
    """The dtype every factor is read in, combined and written: the first adapter's, half
    precision as float32 (PEFT's)."""
    seed: int | None = None
    replays_peft_draws: bool = False
    """The dare masks are drawn after replaying PEFT's draws for the new adapter's initial
    weights, so the same seed gives PEFT's masks."""
    init_lora_weights: bool | str = True
    notes: list[str] = field(default_factory=list)

    @property
    def sources(self) -> dict[ModelReference, PeftAdapter]:
        """The adapters by reference: what the merge downloads (each with ``tensors`` from
        its header, ``revision`` and ``folder``, as a ``ModelSource``); the base's weights are
        never read."""
        return {adapter.ref: adapter for adapter in self.adapters}

    @property
    def random(self) -> bool:
        """The combination draws random masks: the same ``random_seed`` gives the same adapter."""
        return self.combination.type in RANDOM_TYPES

    def revisions(self) -> dict[ModelReference, str]:
        """The commit each Hub reference (the base and the adapters) was read at."""
        revisions = {a.ref: a.revision for a in self.adapters if a.revision}
        if self.base.revision:
            revisions[self.base.ref] = self.base.revision
        return revisions

    @property
    def output_bytes(self) -> int:
        sides = sum(task.in_features + task.out_features for task in self.tasks)
        return sides * self.rank * self.dtype.itemsize

    def describe_models(self) -> str:
        count = len(self.adapters)
        return f"{count} LoRA adapter{'s' if count != 1 else ''} of {self.recipe.base_model}"

    def summary(self) -> list[str]:
        """What ``mergebot validate`` and ``mergebot merge`` print: the combination, then
        each source and the notes."""
        lines = [
            f"ok: {self.combination.type} of {self.describe_models()} into one adapter of "
            f"rank {self.rank}, {len(self.tasks)} modules, {self.output_bytes / 1e6:.1f} MB"
        ]
        lines.append(
            f"  {self.base.ref} (base): {self.base.revision or self.base.ref.local_kind()}"
        )
        for adapter, weight in zip(self.adapters, self.weights, strict=True):
            where = adapter.revision or adapter.ref.local_kind()
            ranks = "/".join(str(rank) for rank in adapter.ranks)
            lines.append(
                f"  {adapter.ref}: rank {ranks}, {len(adapter.modules)} modules, "
                f"weight {weight:g}, {where}"
            )
        return lines + [f"  note: {note}" for note in self.notes]

    def pinned_recipe(self) -> Recipe:
        return self.recipe.with_revisions(self.revisions())

    def reproducible_recipe(self) -> Recipe:
        pinned = self.pinned_recipe()
        if self.seed is None:
            return pinned
        return pinned.model_copy(update={"random_seed": self.seed})


def build_adapter_plan(
    recipe: Recipe, base: ModelSource, adapters: list[PeftAdapter], seed: int | None = None
) -> AdapterPlan:
    """The plan of ``recipe`` (``output: adapter``) from what was read of its base and its
    adapters (in recipe order); every refusal is one sentence naming the field or the file."""
    combination, weights = read_combination(recipe)
    notes: list[str] = []
    if len(adapters) == 1 and combination.type != "linear":
        notes.append(
            f"one adapter: PEFT combines a single adapter linearly, so {combination.type} is not applied"
        )
        combination = Combination("linear")
    fitted = [_fit(i, adapter, base) for i, adapter in enumerate(adapters)]
    notes += _base_names(recipe, fitted)
    if combination.type in FACTOR_TYPES:
        module_ranks = {r for a in fitted for r in a.ranks}
        if len(module_ranks) > 1:
            listed = ", ".join(f"{a.ref} rank {'/'.join(map(str, a.ranks))}" for a in fitted)
            raise RecipeError(
                f"{combination.type} combines the adapters' A and B factors entry by entry, so "
                f"every adapter needs the same rank in every module (PEFT's rule), got {listed}; "
                "use cat, svd or a *_svd type, which take any ranks",
                field="merge_method",
            )
        rank = module_ranks.pop()
    else:
        rank = combination.new_rank([_peft_rank(a) for a in fitted])
    random = combination.type in RANDOM_TYPES
    # Only the masks depend on the order the modules are visited in; building the model on
    # the meta device to learn PEFT's order costs a second and the model's imports.
    order = module_order(base.config) if random else None
    tasks = _tasks(fitted, base, order)
    if combination.type in SVD_TYPES:
        _check_svd_rank(tasks, rank, combination.svd_rank is not None)
    init = fitted[0].config.get("init_lora_weights", True)
    if random:
        seed = (
            recipe.random_seed
            if recipe.random_seed is not None
            else (seed if seed is not None else secrets.randbits(31))
        )
        if order is None:
            notes.append(
                f"transformers cannot build {base.ref} from its config, so the modules are "
                "visited by name and the dare masks differ from PEFT's for the same seed"
            )
        if init not in REPLAYED_INITS:
            notes.append(
                f"{fitted[0].ref} has init_lora_weights {init!r}, whose random draws mergebot "
                "does not replay, so the dare masks differ from PEFT's for the same seed"
            )
    return AdapterPlan(
        recipe=recipe,
        combination=combination,
        weights=weights,
        base=base,
        adapters=fitted,
        tasks=tasks,
        rank=rank,
        dtype=_dtype(fitted),
        seed=seed if random else None,
        replays_peft_draws=random and order is not None and init in REPLAYED_INITS,
        init_lora_weights=init,
        notes=notes,
    )


def _fit(index: int, adapter: PeftAdapter, base: ModelSource) -> PeftAdapter:
    where = f"models[{index}].model"
    # PEFT saves an adapted embedding's base weight beside its LoRA (save_embedding_layers);
    # add_weighted_adapter reads only the LoRA, and so does this.
    whole = sorted(name for name in adapter.replaced if name not in adapter.modules)
    if whole:
        raise RecipeError(
            f"adapter {adapter.ref} trains {', '.join(whole)} whole "
            "(modules_to_save), which combining adapters cannot carry over (PEFT's combined "
            "adapter would hold untrained copies); use adapters without modules_to_save",
            field=where,
        )
    try:
        fitted = adapter.fitted(base.tensors, str(base.ref))
    except SourceError as error:
        raise IncompatibleModelsError(str(error)) from None
    for module in fitted.modules.values():
        if len(fitted.tensors[module.down].shape) != 2:
            raise RecipeError(
                f"adapter {adapter.ref} adapts {module.module} with a convolution kernel, "
                "which mergebot does not combine into an adapter; use adapters of linear and "
                "embedding layers",
                field=where,
            )
    return fitted


def _base_names(recipe: Recipe, adapters: list[PeftAdapter]) -> list[str]:
    """A note per adapter whose config names another base than the recipe."""
    base = str(recipe.base_model)
    return [
        f"{a.ref} says it was trained on {a.base_model}, not {base}; its shapes fit {base}"
        for a in adapters
        if a.base_model and a.base_model != base and a.base_model != recipe.base_model.path
    ]


def _peft_rank(adapter: PeftAdapter) -> int:
    """The rank PEFT sizes a combination by: ``r`` or the largest in ``rank_pattern``."""
    return max([adapter.config["r"], *(adapter.config.get("rank_pattern") or {}).values()])


def _tasks(
    adapters: list[PeftAdapter], base: ModelSource, order: list[str] | None
) -> list[ModuleTask]:
    targeted = list(dict.fromkeys(name for a in adapters for name in a.modules))
    position = {f"{name}.weight": i for i, name in enumerate(order or [])}
    targeted.sort(key=lambda name: (position.get(name, len(position)), _natural(name)))
    tasks = []
    for name in targeted:
        inputs, first = [], None
        for index, adapter in enumerate(adapters):
            module = adapter.modules.get(name)
            if module is None:
                continue
            first = first or module
            if module.fan_in_fan_out != first.fan_in_fan_out:
                raise IncompatibleModelsError(
                    f"{adapters[index].ref} applies its update to {module.module} transposed "
                    f"(fan_in_fan_out) and {adapters[inputs[0].adapter].ref} does not, so their "
                    "factors cannot be combined; re-save one with the other's fan_in_fan_out"
                )
            inputs.append(ModuleInput(index, module.down, module.up, module.scale))
        shape = base.tensors[name].shape
        kind: ModuleKind = "embedding" if first.embedding else "linear"
        # An embedding (PEFT: in = the vocabulary, out = the width) and GPT-2's Conv1D store
        # the weight (in, out); the adapter reader marks both fan_in_fan_out.
        if first.fan_in_fan_out:
            in_features, out_features = shape
        else:
            out_features, in_features = shape
        tasks.append(
            ModuleTask(
                first.module, tuple(inputs), kind, in_features, out_features, first.fan_in_fan_out
            )
        )
    return tasks


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """``layers.2`` before ``layers.10``: the fallback order when the model cannot be built."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in name.split("."))


def _check_svd_rank(tasks: list[ModuleTask], rank: int, given: bool) -> None:
    for task in tasks:
        side = min(task.in_features, task.out_features)
        if rank > side:
            where = "the svd_rank" if given else "the largest adapter rank (the default svd_rank)"
            raise RecipeError(
                f"{where} {rank} is more than {task.module} ({task.out_features} × "
                f"{task.in_features}) can hold (rank {side}); give svd_rank {side} or less",
                field="parameters.svd_rank",
            )


def _dtype(adapters: list[PeftAdapter]) -> torch.dtype:
    """The dtype the factors are combined and written in: the first adapter's, with half
    precision read as float32, as PEFT loads adapters (``autocast_adapter_dtype``)."""
    first = adapters[0]
    module = next(iter(first.modules.values()))
    dtype = first.tensors[module.down].dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
