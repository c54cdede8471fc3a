"""When to retry a Hub call: a pure decision on (error, attempt), so tests check it instantly.

Transient failures (408, 429, 5xx, connection errors) are retried with capped exponential
backoff, honouring ``Retry-After``; permanent ones (a bad token, a missing repo, a bad
request) fail at once, because trying again cannot help.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from huggingface_hub.errors import HfHubHTTPError

from merge_engine.errors import MergeError

T = TypeVar("T")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, error: BaseException, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up now."""
        if attempt >= self.attempts:
            return None
        if isinstance(error, MergeError) and error.__context__ is not None:
            error = error.__context__  # the engine's one-sentence error wraps the Hub's
        if isinstance(error, HfHubHTTPError):
            response = error.response
            if response is None or response.status_code not in TRANSIENT_STATUS:
                return None
            after = response.headers.get("Retry-After", "")
            if after.isdigit():
                return min(float(after), self.max_delay)
        elif not _is_transport_error(error):
            return None
        return min(self.first_delay * 2 ** (attempt - 1), self.max_delay)


def _is_transport_error(error: BaseException) -> bool:
    """A connection or timeout failure, whichever HTTP library the client version uses."""
    name = type(error).__name__
    return (
        isinstance(error, (ConnectionError, TimeoutError)) or "Timeout" in name or "Connect" in name
    )


def with_retries(
    call: Callable[[], T], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run ``call``, retrying transient failures as ``policy`` says."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as error:
            wait = policy.delay(error, attempt)
            if wait is None:
                raise
            sleep(wait)
            attempt += 1
