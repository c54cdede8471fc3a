"""What a plan is: one task per output tensor, and the plan that holds them with the sources,
the data and the output's layout. The executor, the statistics pass, the writers and the card
read these types; the planner (:mod:`merge_engine.plan.planner`) makes them."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_engine.align.step import AlignmentPlan
from merge_engine.data.calibration import CalibrationSource
from merge_engine.methods import MergeMethod
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources.formats.layouts import TRANSFORMERS, Layout
from merge_engine.sources.formats.sd_names import Renamed
from merge_engine.sources.inspection import ModelSource, pinned_parts


@dataclass(frozen=True)
class TensorInput:
    model: ModelReference
    name: str


@dataclass
class TensorTask:
    """How to compute one output tensor."""

    output: str
    shape: tuple[int, ...]
    inputs: list[TensorInput]
    """The merged inputs (the base excluded), in recipe order."""
    base: TensorInput | None
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    """Per-model parameter values, aligned with ``inputs``."""
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    copy_only: bool = False
    """Integer buffers are copied from the base (else the first input), never averaged."""

    def reads(self) -> list[TensorInput]:
        return ([self.base] if self.base else []) + self.inputs


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    sources: dict[ModelReference, ModelSource]
    tasks: list[TensorTask]
    config: dict[str, Any]
    seed: int | None = None
    notes: list[str] = field(default_factory=list)
    calibration: dict[ModelReference, CalibrationSource] = field(default_factory=dict)
    """Each input model's calibration data, for the methods (and alignment) that need data."""
    alignment: AlignmentPlan | None = None
    """The recipe's align step: which models are permuted to match which."""
    layout: Layout = TRANSFORMERS
    """The layout the merged models share."""
    output_format: str = "transformers"
    """The layout written: the sources' format, or the recipe's ``output_layout``."""
    writes: list[Renamed] | None = None
    """When the output layout differs from the sources': the tensors written, in order, each
    made from merged tensors named as the tasks name them."""

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.written_tensors())

    def written_tensors(self) -> list[PlannedTensor]:
        """Every tensor the output holds, in the order it is written."""
        if self.writes is None:
            return [PlannedTensor(t.output, t.shape, t.out_dtype) for t in self.tasks]
        dtypes = {t.output: t.out_dtype for t in self.tasks}
        return [PlannedTensor(r.name, r.shape, dtypes[r.parts[0]]) for r in self.writes]

    @property
    def read_models(self) -> set[ModelReference]:
        """The models whose tensors the merge reads (a config-only donor is not among them)."""
        return {read.model for task in self.tasks for read in task.reads()}

    def describe_models(self) -> str:
        """How many models the merge combines, in the words the job log, ``mergebot validate``
        and the card all use: "3 models (a base and 2 fine-tunes)", or "2 models" for a merge
        without a base. A model that only donates its config or tokenizer is not counted."""
        read = self.read_models
        bases = {task.base.model for task in self.tasks if task.base} & read
        total = f"{len(read)} model{'s' if len(read) != 1 else ''}"
        if not bases:
            return total
        others = len(read - bases)
        base = "a base" if len(bases) == 1 else f"{len(bases)} bases"
        tuned = f"{others} fine-tune{'s' if others != 1 else ''}"
        return f"{total} ({base} and {tuned})" if others else f"{total} ({base})"

    @property
    def random(self) -> bool:
        """The method draws random masks: the same ``random_seed`` gives the same tensors."""
        return self.method.random

    def revisions(self) -> dict[ModelReference, str]:
        """The commit each Hub model repo was read at (both parts of a ``base+adapter``)."""
        return pinned_parts(self.sources)

    def pinned_recipe(self) -> Recipe:
        """The recipe with every Hub source pinned to its resolved commit (both parts of a
        ``base+adapter``)."""
        revisions = self.revisions()
        for data in self.calibration.values():
            if data.spec.dataset is not None and data.revision:
                revisions[data.spec.dataset] = data.revision
        return self.recipe.with_revisions(revisions)

    def statistic_kinds(self) -> list[str]:
        """The statistics the plan's tensors read (both Fisher kinds when filters mix them)."""
        statistic = self.method.statistic
        if statistic is None:
            return []
        return sorted({statistic(task.shared) for task in self.tasks if not task.copy_only})

    def reproducible_recipe(self) -> Recipe:
        """The pinned recipe with the seed actually used."""
        pinned = self.pinned_recipe()
        return (
            pinned.model_copy(update={"random_seed": self.seed})
            if self.seed is not None
            else pinned
        )

    def tensor_seed(self, task: TensorTask) -> int:
        """A seed per output tensor, so random methods give the same result in any order."""
        digest = hashlib.sha256(f"{self.seed}:{task.output}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PlannedModule:
    """One module of a kohya LoRA file before it is computed: its name (as sd-scripts writes
    it) and its factors' shapes."""

    name: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.down_shape[0]
