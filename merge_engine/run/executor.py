"""Executing a plan: one output tensor at a time, the next one's inputs loaded (and moved to the
device) on a background thread while the current one computes; the result streamed to shards
in a hidden staging folder that is renamed into place only when everything, card included, is
written. A failure removes the staging folder, so no half-written model ever looks complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merge_engine.align.step import PermutedStore, run_alignment
from merge_engine.data.calibration import fetch as fetch_calibration
from merge_engine.data.stats import Statistic
from merge_engine.errors import MergeError
from merge_engine.methods import kernel_argument
from merge_engine.methods.sparsify import MagnitudeOrder
from merge_engine.output.conversion import converted
from merge_engine.output.shards import ComponentWriter, ShardedWriter
from merge_engine.output.staging import check_output_dir, staging_folder
from merge_engine.plan.merge_plan import MergePlan, TensorTask
from merge_engine.recipe.schema import ModelReference
from merge_engine.run.statistics import StatsFiles, collect_statistics, default_stats_dir
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.inspection import TOKENIZER_FILES
from merge_engine.sources.inspection import download as download_source
from merge_engine.sources.tensors import TensorStore

Progress = Callable[[int, int, str], None]
"""Called after each output tensor with (done, total, tensor name)."""

RECIPE_NAME = "mergebot_recipe.yaml"


DEFAULT_SHARD_SIZE = 5 * 10**9


def resolve_device(device: str) -> torch.device:
    """``auto`` (the GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if ":" in device else 0
        if index >= count:
            raise MergeError(
                f"--device {device} was asked for, but torch sees {count} CUDA GPU(s); use --device cpu or auto"
            )
        return torch.device(device)
    raise MergeError(
        f"--device {device} is not a device mergebot knows; use auto, cpu, cuda or cuda:N"
    )


class MergeSeries:
    """What a series of merges of the same sources (a search's candidates) keeps from one merge
    to the next: each task vector's magnitude order, by input tensor, base tensor and compute
    dtype, so a magnitude-pruning method looks its density's threshold up; and whether kernels
    that can run ``compiled`` do (the compile takes seconds once, then each merge reads each
    input once instead of some thirty times)."""

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled
        self._orders: dict[tuple, MagnitudeOrder] = {}

    def orders(self, task: TensorTask) -> list[MagnitudeOrder]:
        base = (task.base.model, task.base.name) if task.base else None
        return [
            self._orders.setdefault((i.model, i.name, base, task.compute_dtype), MagnitudeOrder())
            for i in task.inputs
        ]


def compute_task(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    device: torch.device,
    stats: list[Statistic | None] | None = None,
    series: MergeSeries | None = None,
) -> torch.Tensor:
    """Apply the plan's method to one task's loaded inputs (base first, if any) and, for a
    method that needs data, their statistics; ``series`` where the same sources are merged
    again and again."""
    if task.copy_only:
        return tensors[0].to(task.out_dtype)
    if not tensors[0].numel():  # nothing to merge in an empty tensor
        return torch.empty(task.shape, dtype=task.out_dtype, device=device)
    base = tensors[0] if task.base else None
    inputs = tensors[1:] if task.base else tensors
    kwargs = {kernel_argument(k): v for k, v in task.shared.items()}
    for param in plan.method.per_model_params:
        kwargs[param.name] = [values[param.name] for values in task.per_model]
    if plan.method.needs_data:
        kwargs["stats"] = stats
    if series is not None and plan.method.prunes_by_magnitude:
        kwargs["magnitude_orders"] = series.orders(task)
    if series is not None and series.compiled and plan.method.compiles:
        kwargs["compiled"] = True
    if plan.method.random:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(plan.tensor_seed(task))
    with torch.no_grad():
        result = plan.method.kernel(inputs, base, **kwargs)
    return result.to(task.out_dtype)


PAGE = 4096


def _materialize(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """Bring a tensor to the device and dtype on the prefetch thread. A memory-mapped CPU
    tensor that needs no conversion gets one read per page instead, so the page faults of
    reading it overlap with the previous tensor's computation rather than stall this one's."""
    moved = tensor.to(device=device, dtype=dtype)
    if moved.data_ptr() == tensor.data_ptr() and tensor.numel():
        tensor.reshape(-1)[:: max(1, PAGE // tensor.element_size())].sum()
    return moved


def _last_readers(plan: MergePlan) -> dict[int, list[tuple]]:
    """For each task index, the (model, file) pairs that no later task reads."""
    last: dict[tuple, int] = {}
    for index, task in enumerate(plan.tasks):
        for read in task.reads():
            last[(read.model, plan.sources[read.model].tensors[read.name].file)] = index
    by_task: dict[int, list[tuple]] = {}
    for key, index in last.items():
        by_task.setdefault(index, []).append(key)
    return by_task


def _stores(plan: MergePlan) -> dict[ModelReference, TensorStore]:
    """Each read model's tensors; an aligned model's permuted as they are read."""
    stores = {ref: plan.sources[ref].store() for ref in plan.read_models}
    alignment = plan.alignment
    if alignment is None:
        return stores
    if set(alignment.perms) != set(alignment.models):
        raise MergeError(
            "the recipe aligns its models first; merge it with write_merge (mergebot merge), which runs the align step"
        )
    for ref, perms in alignment.perms.items():
        stores[ref] = PermutedStore(stores[ref], alignment.spec, perms)
    return stores


def iter_merged(
    plan: MergePlan,
    device: torch.device,
    progress: Progress | None = None,
    stats_files: StatsFiles | None = None,
    series: MergeSeries | None = None,
) -> Iterator[tuple[TensorTask, torch.Tensor]]:
    """Yield (task, merged tensor) in plan order, prefetching the next task's inputs (and
    their statistics) and unmapping each input file after its last reader."""
    stores = _stores(plan)
    finished_files = _last_readers(plan)

    def load(task: TensorTask) -> tuple[list[torch.Tensor], list[Statistic | None] | None]:
        dtype = None if task.copy_only else task.compute_dtype
        tensors = [
            _materialize(stores[read.model].get(read.name), device, dtype) for read in task.reads()
        ]
        return tensors, _task_statistics(plan, task, stats_files, device)

    total = len(plan.tasks)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebot-prefetch") as pool:
        pending: Future | None = pool.submit(load, plan.tasks[0]) if total else None
        for index, task in enumerate(plan.tasks):
            tensors, stats = pending.result()
            pending = pool.submit(load, plan.tasks[index + 1]) if index + 1 < total else None
            result = compute_task(plan, task, tensors, device, stats, series)
            del tensors, stats
            yield task, result
            del result
            for model, file in finished_files.get(index, []):
                stores[model].release(file)
            if progress:
                progress(index + 1, total, task.output)


def _task_statistics(
    plan: MergePlan, task: TensorTask, stats_files: StatsFiles | None, device: torch.device
) -> list[Statistic | None] | None:
    """Each input's statistic for this tensor, on the device; None where the method reads none."""
    statistic = plan.method.statistic
    if statistic is None or task.copy_only or task.shared.get("use_data") is False:
        return None
    if stats_files is None:
        raise MergeError(
            f"{plan.method.name} needs the statistics pass first; run it with write_merge or collect_statistics"
        )
    kind = statistic(task.shared)
    found = [stats_files[(read.model, kind)].get(read.name) for read in task.inputs]
    return [
        None if s is None else Statistic(s.value.to(device), s.model_mean, s.transposed)
        for s in found
    ]


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MergeError(
            f"the disk holding {folder} has {free / 1e6:.1f} MB free but the merged weights need "
            f"{needed / 1e6:.1f} MB; free some space or choose an output folder on another disk"
        )


SIDE_FILE_SUFFIXES = (".json", ".txt")
"""What a diffusers folder holds besides weights: configs, tokenizers, the scheduler."""


def _copy_pipeline_files(plan: MergePlan, staging: Path) -> None:
    """A diffusers output gets the donor's configs, tokenizers and scheduler; a baked VAE
    brings its own config when it has one."""
    donor = plan.sources[plan.recipe.donor()]
    for path in sorted(donor.folder.rglob("*")):
        name = path.relative_to(donor.folder)
        if path.suffix in SIDE_FILE_SUFFIXES and not path.name.endswith(".safetensors.index.json"):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, staging / name)
    vae = plan.sources[plan.recipe.vae] if plan.recipe.vae else None
    origin = vae.origin if vae and vae.origin else vae
    if origin is not None and origin.folder is not None:
        own = "config.json" if origin.layout.family == "state_dict" else "vae/config.json"
        if (origin.folder / own).is_file() and (staging / "vae").is_dir():
            shutil.copy(origin.folder / own, staging / "vae" / "config.json")


def _copy_side_files(plan: MergePlan, staging: Path) -> None:
    if plan.output_format == "diffusers":
        _copy_pipeline_files(plan, staging)
        return
    if plan.layout != TRANSFORMERS:
        if plan.config and plan.output_format == "state_dict":  # a diffusers component's
            (staging / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        return
    tokenizer_ref = plan.recipe.tokenizer_donor()
    tokenizer_folder = plan.sources[tokenizer_ref].folder
    for name in TOKENIZER_FILES:
        if tokenizer_folder and (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, staging / name)
    donor_folder = plan.sources[plan.recipe.donor()].folder
    if donor_folder and (donor_folder / "generation_config.json").is_file():
        shutil.copy(donor_folder / "generation_config.json", staging / "generation_config.json")
    (staging / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")


def _open_writer(
    plan: MergePlan, staging: Path, shard_size: int
) -> ShardedWriter | ComponentWriter:
    """Shards as the output layout has them: one folder per component for diffusers, one
    file carrying the recipe for a single-file checkpoint, ``model*.safetensors`` otherwise."""
    planned = plan.written_tensors()
    if plan.output_format == "diffusers":
        return ComponentWriter(staging, planned, shard_size)
    if plan.output_format == "single_file":
        recipe = {"mergebot_recipe": plan.reproducible_recipe().to_yaml()}
        return ShardedWriter(staging, planned, sum(t.nbytes for t in planned) + 1, metadata=recipe)
    return ShardedWriter(staging, planned, shard_size)


def download_plan(
    plan: MergePlan, token: str | bool | None = None, cache_dir: Path | None = None
) -> None:
    """Fetch the files the plan needs from the Hub: weights of the models it reads, the config
    donor's config, the tokenizer donor's tokenizer; for a merge with data, every model's
    tokenizer and the pinned calibration files. Local sources need nothing."""
    read = plan.read_models
    tokenizer_donor = plan.recipe.tokenizer_donor()
    runs_models = set(plan.calibration)  # the statistics pass tokenizes with each model's own
    for ref in read | {plan.recipe.donor(), tokenizer_donor}:
        download_source(
            plan.sources[ref],
            token,
            weights=ref in read,
            tokenizer=ref == tokenizer_donor or ref in runs_models,
            cache_dir=cache_dir,
        )
    for data in {id(c): c for c in plan.calibration.values()}.values():
        fetch_calibration(data, token, cache_dir)


def write_merge(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    device: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    token: str | bool | None = None,
    show_progress: bool = True,
    progress: Progress | None = None,
    card_command: str | None = None,
    cache_dir: Path | None = None,
    stats_dir: Path | None = None,
    card_section: str | None = None,
    card_details: dict[str, Any] | None = None,
) -> Path:
    """Download what the plan reads (into ``cache_dir`` when given), run the statistics pass
    of a method that needs data (kept in ``stats_dir``), merge, and publish ``out_dir``
    atomically. ``progress`` counts calibration batches, then output tensors; ``card_section``
    is added to the card (how the recipe was found), ``card_details`` are further arguments of
    :func:`merge_engine.output.card.build_card`."""
    from merge_engine.output.card import build_card

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(out_dir.parent, plan.output_bytes)
    torch_device = resolve_device(device)
    download_plan(plan, token, cache_dir)
    stats_files, stats_units = None, 0
    if plan.method.needs_data:

        def report_stats(done: int, total: int, what: str) -> None:
            nonlocal stats_units
            stats_units = total
            if progress:
                progress(done, total + len(plan.tasks), what)

        stats_files = collect_statistics(
            plan, stats_dir or default_stats_dir(), torch_device, show_progress, report_stats
        )

    bar = tqdm(
        total=len(plan.tasks),
        desc=f"{plan.method.name} merge",
        unit="tensor",
        disable=not show_progress,
    )

    def report(done: int, total: int, name: str) -> None:
        bar.update(1)
        if progress:
            progress(stats_units + done, stats_units + total, name)

    try:
        with staging_folder(out_dir) as staging:
            writer = _open_writer(plan, staging, shard_size)
            try:
                if plan.alignment is not None:
                    run_alignment(
                        plan.alignment,
                        plan.sources,
                        plan.calibration,
                        staging,
                        torch_device,
                        show_progress,
                        progress,
                    )
                merged = iter_merged(plan, torch_device, report, stats_files)
                if plan.writes is None:
                    for task, tensor in merged:
                        writer.write(task.output, tensor)
                else:
                    for target, tensor in converted(merged, plan.writes):
                        writer.write(target.name, tensor)
                writer.finish()
            finally:
                writer.close()
            _copy_side_files(plan, staging)
            (staging / RECIPE_NAME).write_text(plan.reproducible_recipe().to_yaml())
            card = build_card(
                plan,
                name=out_dir.name,
                command=card_command,
                section=card_section,
                **(card_details or {}),
            )
            card.save(staging / "README.md")
    finally:
        bar.close()
    return out_dir
