"""Job status as the API and the Space serve it: each job's row (or a search's status, with its
trials) is read from the database at most once per ``seconds`` in a process, so a crowd
polling one job costs one read per window instead of one per request (and leaves the machine
to the merges). A status is at most that old; what this process changes itself (a submit, a
cancel) is forgotten at once and read fresh."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.workflows.job_store import Job

READ_EVERY_SECONDS = 0.2
"""Shorter than the merge's progress writes (every 0.5 s): no progress step is hidden."""


@dataclass(frozen=True)
class JobView:
    job: Job
    data: dict[str, Any]
    """What ``render`` made of the job, once per read for every requester who may see it."""
    body: bytes
    """The same as JSON."""


class RecentJobs:
    def __init__(
        self,
        read: Callable[[str], Job | None],
        seconds: float = READ_EVERY_SECONDS,
        max_entries: int = 1024,
        render: Callable[[Job], dict[str, Any]] = Job.to_json,
    ):
        self.read, self.seconds, self.max_entries = read, seconds, max_entries
        self.render = render
        self._views: OrderedDict[str, tuple[float, JobView | None]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, job_id: str) -> tuple[bool, JobView | None]:
        """(True, the view) when ``job_id`` was read less than ``seconds`` ago, without
        touching the database; else (False, None)."""
        with self._lock:
            expires, view = self._views.get(job_id, (0.0, None))
        return (True, view) if expires > time.monotonic() else (False, None)

    def load(self, job_id: str) -> JobView | None:
        """Read ``job_id`` from the database now and keep it for ``seconds``."""
        job = self.read(job_id)
        data = self.render(job) if job else None
        # NaN is not JSON: a render that lets one through fails here, not in a client
        view = JobView(job, data, json.dumps(data, allow_nan=False).encode()) if job else None
        with self._lock:
            self._views[job_id] = (time.monotonic() + self.seconds, view)
            self._views.move_to_end(job_id)
            while len(self._views) > self.max_entries:
                self._views.popitem(last=False)
        return view

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._views.pop(job_id, None)
