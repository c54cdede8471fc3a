"""When to retry a Hub call: a pure decision on (error, attempt, time waited so far), so tests
check it instantly.

Transient failures (408, 429, 5xx, connection errors and timeouts) are retried with capped
exponential backoff, honouring ``Retry-After``, for up to ``patience`` seconds in all: a Hub
outage of a few minutes passes unnoticed but for a log line per retry. Permanent failures (a
bad token, a missing repo, a bad request) fail at once, because trying again cannot help. When
the patience runs out the call fails with :class:`HubOutage`, which says how long it waited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from huggingface_hub.errors import HfHubHTTPError

from merge_engine.errors import MergeError
from merge_engine.sources.hub_failures import TRANSIENT_STATUS, is_unreachable
from service.errors import HubUnavailable

T = TypeVar("T")


class HubOutage(MergeError):
    """The Hub stayed unreachable (or kept answering 5xx) for the whole patience."""

    def __init__(self, waited: float, cause: BaseException):
        self.waited = waited
        during = f" for {waited:.0f} s" if waited >= 1 else ""
        super().__init__(f"the Hub could not be reached{during} ({_summary(cause)})")


@dataclass(frozen=True)
class RetryPolicy:
    patience: float = 600.0
    """Seconds of transient failures ridden out before giving up."""
    first_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, error: BaseException, attempt: int, waited: float = 0.0) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` after ``waited`` seconds of trying,
        or None to give up now."""
        if not is_transient(error) or waited >= self.patience:
            return None
        wait = min(self.first_delay * 2 ** (attempt - 1), self.max_delay)
        response = getattr(_cause(error), "response", None)
        after = response.headers.get("Retry-After", "") if response is not None else ""
        if after.isdigit():
            wait = min(float(after), self.max_delay)
        return min(wait, self.patience - waited)


def _cause(error: BaseException) -> BaseException:
    """The Hub's or the transport's error under the engine's one-sentence error, if any."""
    if isinstance(error, MergeError) and error.__context__ is not None:
        return error.__context__
    return error


def is_transient(error: BaseException) -> bool:
    """Whether trying again later can help: the Hub was unreachable, slow, or answered 5xx/429."""
    if isinstance(error, (HubOutage, HubUnavailable)):
        return True
    error = _cause(error)
    if isinstance(error, HfHubHTTPError):
        response = error.response
        return response is not None and response.status_code in TRANSIENT_STATUS
    return is_unreachable(error)


def _summary(error: BaseException) -> str:
    error = _cause(error)
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"it answered {error.response.status_code}"
    return type(error).__name__


def with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Run ``call``, retrying transient failures as ``policy`` says; ``on_retry`` hears one
    sentence per retry ("Hub unreachable (ConnectError), retrying in 4 s")."""
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return call()
        except Exception as error:
            waited = time.monotonic() - started
            wait = policy.delay(error, attempt, waited)
            if wait is None:
                if attempt > 1 and is_transient(error):
                    raise HubOutage(waited, error) from error
                raise
            if on_retry is not None:
                on_retry(f"Hub unreachable ({_summary(error)}), retrying in {wait:.0f} s")
            sleep(wait)
            attempt += 1
