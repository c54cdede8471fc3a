"""Stopping a search in the middle of a trial.

A trial can take minutes (a large candidate to merge, many examples to score), and a search
asked to stop (cancelled, or told to publish its best so far) or out of wall time must not
wait for it. The work of a trial asks a :class:`StopCheck` between tensors while a candidate
is merged and between batches (and generation steps) while it is scored; once the search is
to stop, the check raises :class:`SearchStopped`. The study fails that trial, so it never
counts as a result, and the search ends with the trials completed before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from merge_engine.errors import MergeError

STOP_CHECK_SECONDS = 0.5
"""How often a trial's work asks the caller whether to stop (the caller may read a database);
the deadline is compared at every check."""


class SearchStopped(MergeError):
    """The search was stopped inside a trial; the trial is abandoned."""

    def __init__(self) -> None:
        super().__init__(
            "the search stopped (its wall time ran out, or it was asked to stop) before it finished a trial; "
            "there is nothing to publish: give it more budget.wall_time"
        )


StopCheckFunction = Callable[[], None]
"""Asked by a trial's work (before each tensor, each forward pass); raises to abandon it."""


def never_stop() -> None:
    """The check of work that nothing stops (the final scoring of the winner)."""


class StopCheck:
    """Whether the search is to stop: ``asked()`` (the caller's question; it may also raise,
    as a cancelled job does) or ``deadline`` (``time.monotonic()``) passed. Calling the check
    raises :class:`SearchStopped` when it is."""

    def __init__(self, asked: Callable[[], bool] | None, every: float = STOP_CHECK_SECONDS):
        self.asked, self.every = asked, every
        self.deadline: float | None = None
        self.stopped = False
        """Set once ``asked()`` said yes: the search ends, whatever stage comes next."""
        self._next_question = 0.0

    def requested(self) -> bool:
        """Ask now (between trials)."""
        self._next_question = time.monotonic() + self.every
        self.stopped = self.stopped or bool(self.asked and self.asked())
        return self.stopped

    def __call__(self) -> None:
        """Within a trial: raise :class:`SearchStopped` when the deadline passed or (asked at
        most every ``every`` seconds) the caller wants the search to stop."""
        now = time.monotonic()
        out_of_time = self.deadline is not None and now >= self.deadline
        if out_of_time or self.stopped or (now >= self._next_question and self.requested()):
            raise SearchStopped()
