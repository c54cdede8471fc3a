"""The statistics pass of a merge that needs data: each input model loaded alone (on the
merge's device), run on its calibration batches, its statistics saved as safetensors under a
key of model revision + calibration data + statistic, so that a second merge of the same
models with other coefficients reads them instead of running the models again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from merge_engine.data import calibration
from merge_engine.data.calibration import load_model
from merge_engine.data.stats import (
    StatsFile,
    fisher_diagonal,
    gram_matrices,
    save_stats,
    transposed_weights,
)
from merge_engine.plan.merge_plan import MergePlan
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.inspection import ModelSource, model_task

STATS_FORMAT = 1
"""Part of every key: raise it when the statistics' definition changes."""

StatsFiles = dict[tuple[ModelReference, str], StatsFile]
Progress = Callable[[int, int, str], None]


def _model_identity(source: ModelSource) -> str:
    """What the statistics were computed on: a Hub commit, else the local files' names, sizes
    and times; a ``base+adapter`` both parts."""
    identity = _files_identity(source.ref.path, source.revision, source.folder)
    if source.adapter is None:
        return identity
    adapter = source.adapter
    return f"{identity}+{_files_identity(adapter.ref.path, adapter.revision, adapter.folder)}"


def _files_identity(path: str, revision: str | None, folder: Path | None) -> str:
    if revision:
        return f"{path}@{revision}"
    assert folder is not None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(folder.resolve()), stamps])


def stats_path(plan: MergePlan, ref: ModelReference, kind: str, stats_dir: Path) -> Path:
    key = json.dumps(
        [
            STATS_FORMAT,
            kind,
            _model_identity(plan.sources[ref]),
            plan.calibration[ref].fingerprint,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return stats_dir / f"{kind}-{digest}.safetensors"


def collect_statistics(
    plan: MergePlan,
    stats_dir: Path,
    device: torch.device,
    show_progress: bool = True,
    progress: Progress | None = None,
) -> StatsFiles:
    """Compute what is missing under ``stats_dir``, then open every statistic the plan reads.
    ``progress`` is called with (batches done, batches to do, what)."""
    kinds = plan.statistic_kinds()
    models = [m.model for m in plan.recipe.models or []]
    paths = {(ref, k): stats_path(plan, ref, k, stats_dir) for ref in models for k in kinds}
    missing = {ref: [k for k in kinds if not paths[ref, k].is_file()] for ref in models}
    prepared = {
        ref: _batches(plan, ref) for ref, todo in missing.items() if todo
    }  # every data error before the first model runs
    counter = _Counter(
        sum(len(prepared[ref]) * len(todo) for ref, todo in missing.items() if todo), progress
    )
    for ref, todo in missing.items():
        if not todo:
            continue
        model = load_model(plan.sources[ref]).to(device)
        samples = sum(len(b["input_ids"]) for b in prepared[ref])
        for kind in todo:
            batches = counter.count(prepared[ref], f"{kind} of {ref}")
            if kind == "gram":
                stats = gram_matrices(model, batches, str(device), show_progress)
            else:
                mode = kind.removeprefix("fisher_")
                seed = plan.calibration[ref].spec.seed
                stats = fisher_diagonal(model, batches, mode, str(device), seed, show_progress)  # type: ignore[arg-type]
            dtype = torch.float32 if kind == "gram" else None
            save_stats(stats, paths[ref, kind], transposed_weights(model), samples, dtype)
            del stats
        del model
        gc.collect()
    files = {key: StatsFile(path) for key, path in paths.items()}
    for (ref, _), file in files.items():
        plan.calibration[ref].samples_used[ref] = file.samples
    return files


class _Counter:
    """Counts batches across every model and statistic, for one progress figure."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self.progress = total, 0, progress

    def count(self, batches: list[Any], what: str) -> _Counted:
        return _Counted(self, batches, what)


class _Counted:
    """One model's batches, reporting to the counter as they are consumed; sized, so the
    progress bar knows its total."""

    def __init__(self, counter: _Counter, batches: list[Any], what: str):
        self.counter, self.batches, self.what = counter, batches, what

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        counter = self.counter
        for batch in self.batches:
            yield batch
            counter.done += 1
            if counter.progress:
                counter.progress(counter.done, counter.total, self.what)


def default_stats_dir() -> Path:
    """Where ``mergebot merge`` keeps statistics: ``$XDG_CACHE_HOME/mergebot/statistics``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mergebot" / "statistics"


def _batches(plan: MergePlan, ref: ModelReference) -> list[dict[str, torch.Tensor]]:
    config = plan.sources[ref].config
    label_ids = None
    if model_task(config) == "classification":
        id2label = config.get("id2label") or {}
        count = config.get("num_labels") or len(id2label) or 2
        label_ids = {str(id2label.get(str(i), i)): i for i in range(count)}
    folders = [plan.sources[ref].folder, plan.sources[plan.recipe.tokenizer_donor()].folder]
    tokenizer = calibration.load_tokenizer(folders, ref)
    return calibration.batches(plan.calibration[ref], tokenizer, label_ids)
