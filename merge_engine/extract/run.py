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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from merge_engine.extract.card import extraction_card
from merge_engine.extract.plan import ExtractedModule, ExtractionPlan
from merge_engine.extract.result import ExtractionResult, ModuleResult
from merge_engine.methods.low_rank import factor
from merge_engine.output.peft_adapter import LoraModule, PeftAdapter, PeftAdapterWriter
from merge_engine.output.staging import staging_folder
from merge_engine.plan.merge_plan import PlannedTensor
from merge_engine.run.executor import resolve_device
from merge_engine.sources.inspection import download, model_task
from merge_engine.sources.layers import sort_key
from merge_engine.sources.tensors import TensorStore

Progress = Callable[[int, int, str], None]
"""Called after each module with (done, total, module name)."""


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


class _Reader:
    """The two models' tensors, read in one order: each file is unmapped after the last
    tensor read from it, so the pages of one file at a time stay in the process."""

    def __init__(self, plan: ExtractionPlan, order: list[str]):
        self.finetune, self.base = plan.finetune.store(), plan.base.store()
        self._release_after: dict[str, list[tuple[TensorStore, str]]] = {}
        for store, source in ((self.finetune, plan.finetune), (self.base, plan.base)):
            last = {source.tensors[name].file: name for name in order}
            for file, name in last.items():
                self._release_after.setdefault(name, []).append((store, file))

    def done(self, name: str) -> None:
        for store, file in self._release_after.pop(name, []):
            store.release(file)


class _Spool:
    """Factors kept on disk, one small safetensors file per module, until the adapter's
    header can be laid out (with an energy threshold, once every rank is known)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self._files: dict[str, Path] = {}

    def put(self, module: str, up: torch.Tensor, down: torch.Tensor) -> None:
        path = self.folder / f"{len(self._files)}.safetensors"
        save_file({"up": up.cpu().contiguous(), "down": down.cpu().contiguous()}, path)
        self._files[module] = path

    def get(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self._files[module], framework="pt") as spooled:
            return spooled.get_tensor("up"), spooled.get_tensor("down")

    def remove(self) -> None:
        shutil.rmtree(self.folder)


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
    ``out_dir`` with its card (``command``: how the card says to reproduce it, by default
    the extraction with both models pinned). ``progress`` is called after each module."""
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    modules = {m.weight: m for m in plan.modules}
    saved = set(plan.saved)
    order = sorted([*modules, *plan.saved, *plan.left_out], key=sort_key)
    results: dict[str, ModuleResult] = {}
    differing: list[tuple[str, float]] = []
    bar = tqdm(total=len(modules), desc="extract-lora", unit="module", disable=not show_progress)
    writer: PeftAdapterWriter | None = None
    with staging_folder(out_dir) as staging:
        try:
            for source in (plan.finetune, plan.base):
                download(source, token, cache_dir=cache_dir)
            reader = _Reader(plan, order)
            if plan.energy is None:  # every rank known: straight into the file
                writer = PeftAdapterWriter(staging, _adapter(plan, [plan.rank] * len(modules)))
                loras = {lora.name: lora for lora in writer.adapter.modules}
            else:
                spool = _Spool(staging / ".spool")
            for name in order:
                if name in modules:
                    module = modules[name]
                    delta = _delta(module, reader.finetune, reader.base, torch_device)
                    found = factor(delta, plan.rank, plan.energy, name=name)
                    del delta
                    results[module.name] = ModuleResult(
                        module.name, found.rank, found.relative_error
                    )
                    if writer is not None:
                        writer.write_module(loras[module.name], found.up, found.down)
                    else:
                        spool.put(module.name, found.up.to(plan.dtype), found.down.to(plan.dtype))
                    bar.update(1)
                    if progress:
                        progress(len(results), len(modules), module.name)
                elif name in saved:
                    if writer is not None:
                        writer.write_saved(name, reader.finetune.get(name))
                else:
                    difference = _relative_difference(
                        reader.finetune.get(name), reader.base.get(name)
                    )
                    if difference > 0 or math.isnan(difference):
                        differing.append((name, difference))
                reader.done(name)
            if writer is None:  # every rank now known: the spool into the file
                ranks = [results[m.name].rank for m in plan.modules]
                writer = PeftAdapterWriter(staging, _adapter(plan, ranks))
                for entry in writer.adapter.write_order():
                    if isinstance(entry, LoraModule):
                        writer.write_module(entry, *spool.get(entry.name))
                    else:
                        writer.write_saved(entry.name, reader.finetune.get(entry.name))
                spool.remove()
            differing.sort(key=lambda item: -item[1])
            result = ExtractionResult(out_dir, [results[m.name] for m in plan.modules], differing)
            writer.finish(extraction_card(plan, result, out_dir.name, command))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    return result
