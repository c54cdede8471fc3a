"""Running an extraction: one module at a time, the base's and the fine-tune's weight read from
memory-mapped safetensors, their difference factored by the truncated SVD
(:func:`merge_engine.methods.low_rank.factor`) and its factors streamed into the adapter
(:class:`merge_engine.output.peft_adapter.PeftAdapterWriter`); memory stays a few tensors and
the SVD's workspace, whatever the model's size. Each file is unmapped once its last tensor is
read. The folder is published atomically (:func:`merge_engine.output.staging.staging_folder`).

At a fixed rank the adapter's header is known before the first SVD, so the factors go
straight into the file. With an energy threshold each module's rank is only known after its
SVD: the factors are spooled into one small safetensors file per module beside the output,
then streamed into the adapter once every rank is known (the adapter is written twice, the
model's weights still read once).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from merge_engine.extract.card import extraction_card
from merge_engine.extract.plan import ExtractedModule, ExtractionPlan
from merge_engine.extract.result import ExtractionResult, ModuleResult
from merge_engine.methods.low_rank import LowRankFactors, factor
from merge_engine.output.peft_adapter import LoraModule, PeftAdapter, PeftAdapterWriter
from merge_engine.output.staging import staging_folder
from merge_engine.plan.merge_plan import PlannedTensor
from merge_engine.run.executor import resolve_device
from merge_engine.sources.inspection import download, model_task
from merge_engine.sources.tensors import TensorStore

Progress = Callable[[int, int, str], None]
"""Called after each module with (done, total, module name)."""


class _Releaser:
    """Unmaps each file of a store after the last tensor read from it."""

    def __init__(self, store: TensorStore, files: dict[str, str], order: list[str]):
        self.store = store
        self.last = {files[name]: name for name in order}

    def done(self, name: str) -> None:
        for file, last in self.last.items():
            if last == name:
                self.store.release(file)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _delta(
    module: ExtractedModule, finetune: TensorStore, base: TensorStore, device: torch.device
) -> torch.Tensor:
    tuned = finetune.get(module.weight)
    dtype = _compute_dtype(tuned.dtype)
    delta = tuned.to(device, dtype) - base.get(module.weight).to(device, dtype)
    return delta.T if module.kind != "linear" else delta


def _lora_module(module: ExtractedModule, rank: int) -> LoraModule:
    out, inputs = module.factored_shape
    return LoraModule(
        module.name, (out, rank), (rank, inputs), float(rank), module.kind == "embedding"
    )


def _adapter(plan: ExtractionPlan, ranks: list[int]) -> PeftAdapter:
    tensors = plan.finetune.tensors
    return PeftAdapter(
        base_model=plan.base.ref.path,
        base_revision=plan.base.revision,
        modules=tuple(_lora_module(m, r) for m, r in zip(plan.modules, ranks, strict=True)),
        dtype=plan.dtype,
        saved=tuple(PlannedTensor(n, tensors[n].shape, tensors[n].dtype) for n in plan.saved),
        base_modules={n.rpartition(".")[0] for n in tensors if n.endswith(".weight")},
        task_type="CAUSAL_LM" if model_task(plan.finetune.config) == "causal_lm" else None,
        fan_in_fan_out=plan.fan_in_fan_out,
    )


def _relative_difference(tuned: torch.Tensor, base: torch.Tensor) -> float:
    dtype = _compute_dtype(tuned.dtype)
    difference = float(torch.linalg.vector_norm(tuned.to(dtype) - base.to(dtype)))
    norm = float(torch.linalg.vector_norm(base.to(dtype)))
    return difference / norm if norm > 0 else difference


def extract_lora(
    plan: ExtractionPlan,
    out_dir: str | Path,
    *,
    device: str = "auto",
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    progress: Progress | None = None,
    command: str | None = None,
) -> ExtractionResult:
    """Download what the plan reads (pinned), factor every module, write the adapter folder
    ``out_dir`` with its card (``command``: how the card says to reproduce it)."""
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    with staging_folder(out_dir) as staging:
        for source in (plan.finetune, plan.base):
            download(source, token, cache_dir=cache_dir)
        finetune, base = plan.finetune.store(), plan.base.store()
        order = [m.weight for m in plan.modules] + plan.saved + plan.left_out
        releasers = [
            _Releaser(store, {n: source.tensors[n].file for n in order}, order)
            for store, source in ((finetune, plan.finetune), (base, plan.base))
        ]

        def read(name: str) -> None:
            for releaser in releasers:
                releaser.done(name)

        bar = tqdm(
            total=len(plan.modules), desc="extract-lora", unit="module", disable=not show_progress
        )

        def factored() -> Iterator[tuple[ExtractedModule, LowRankFactors]]:
            for done, module in enumerate(plan.modules, 1):
                delta = _delta(module, finetune, base, torch_device)
                found = factor(delta, plan.rank, plan.energy, name=module.weight)
                del delta
                read(module.weight)
                yield module, found
                bar.update(1)
                if progress:
                    progress(done, len(plan.modules), module.name)

        results: list[ModuleResult] = []

        def record(module: ExtractedModule, found: LowRankFactors) -> None:
            results.append(ModuleResult(module.name, found.rank, found.relative_error))

        writer: PeftAdapterWriter | None = None
        try:
            if plan.energy is None:
                writer = PeftAdapterWriter(staging, _adapter(plan, [plan.rank] * len(plan.modules)))
                for lora, (module, found) in zip(writer.adapter.modules, factored(), strict=True):
                    record(module, found)
                    writer.write_module(lora, found.up, found.down)
            else:
                writer = _spooled(plan, staging, factored(), record)
            for name in plan.saved:
                writer.write_saved(name, finetune.get(name))
                read(name)
            differing = []
            for name in plan.left_out:
                difference = _relative_difference(finetune.get(name), base.get(name))
                read(name)
                if difference > 0 or math.isnan(difference):
                    differing.append((name, difference))
            differing.sort(key=lambda item: -item[1])
            result = ExtractionResult(out_dir, results, differing)
            writer.finish(extraction_card(plan, result, out_dir.name, command))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    return result


def _spooled(
    plan: ExtractionPlan,
    staging: Path,
    factored: Iterator[tuple[ExtractedModule, LowRankFactors]],
    record: Callable[[ExtractedModule, LowRankFactors], None],
) -> PeftAdapterWriter:
    """Factor every module into a spool file of its own, then open the adapter (its ranks now
    known) and stream the spooled factors into it; the spool is removed."""
    spool = staging / ".spool"
    spool.mkdir()
    ranks = []
    for index, (module, found) in enumerate(factored):
        record(module, found)
        ranks.append(found.rank)
        cast = {"up": found.up.to(plan.dtype), "down": found.down.to(plan.dtype)}
        save_file(
            {k: v.cpu().contiguous() for k, v in cast.items()}, spool / f"{index}.safetensors"
        )
    writer = PeftAdapterWriter(staging, _adapter(plan, ranks))
    for index, module in enumerate(writer.adapter.modules):
        with safe_open(spool / f"{index}.safetensors", framework="pt") as spooled:
            writer.write_module(module, spooled.get_tensor("up"), spooled.get_tensor("down"))
    shutil.rmtree(spool)
    return writer
