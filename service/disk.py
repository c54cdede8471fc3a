"""Room on the disk of the work dir for a job: checked when the job is submitted (on the API's
disk) and again by the worker before it downloads (on its own), each time for the job's
sources and output plus a margin the bot keeps free. Jobs share the disk, so a disk can still
fill during a job: that job fails with one sentence and its folder is removed (see
``service.workflows.job_workflow``), and the other jobs carry on.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping
from pathlib import Path

from merge_engine.plan.kinds import Plan
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.inspection import ModelSource
from service.errors import DiskFull

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""What a write answers when the disk (or the quota, or the per-file limit) has no room."""


def source_bytes(sources: Mapping[ModelReference, ModelSource]) -> int:
    """The weights of ``sources``, from their headers: what the job downloads (a
    ``base+adapter``'s adapter too)."""
    total = 0
    for source in sources.values():
        adapter = getattr(source, "adapter", None)  # an adapter output's sources are adapters
        infos = [*source.tensors.values(), *(adapter.tensors.values() if adapter else ())]
        total += sum(info.nbytes for info in infos)
    return total


def merge_bytes(plan: Plan) -> int:
    """What a merge downloads and writes: its sources, and its output."""
    return source_bytes(plan.sources) + plan.output_bytes


def search_bytes(sources: Mapping[ModelReference, ModelSource]) -> int:
    """What a search downloads and writes: its sources, and a winner of the largest one's
    size."""
    largest = max((source_bytes({ref: s}) for ref, s in sources.items()), default=0)
    return source_bytes(sources) + largest


def check_room(folder: Path, needed: int, margin: int, whose: str) -> None:
    """Refuse a job that needs ``needed`` bytes when ``folder``'s disk has less than that plus
    ``margin`` free; ``whose`` names the disk in the sentence ("the bot's", "the worker's")."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + margin > free:
        raise DiskFull(
            f"{whose} disk has {_size(free)} free, and this job needs {_size(needed)} for its sources and output "
            f"plus the {_size(margin)} the bot keeps free (MERGEBOT_DISK_MARGIN_GB); try again later, or merge smaller models"
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a write that found no room."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in FULL:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _size(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e9 else f"{count / 1e6:,.1f} MB"
