"""One sentence for a Hub read that failed, telling failures that trying again can fix (the
Hub or the network down, a 5xx, a 429) from those it never can (a repo, revision or file that
does not exist, a token refused, a file that cannot be read): the first say to try again, the
second say what is wrong and what to change."""

from __future__ import annotations

from merge_engine.errors import excerpt

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that say the Hub may answer differently later."""


def answered(status: int | None, what: str) -> str:
    """The Hub answered ``status`` while reading ``what`` (a repo, a file of it)."""
    if status == 401:
        return f"the Hub did not accept the token while reading {what} (401); sign in again, or use a token that can read it"
    if status == 403:
        return f"the Hub refused access while reading {what} (403); ask for access on the Hub, or use a token that can read it"
    if status == 404:
        return f"the Hub found nothing while reading {what} (404): the repo, the revision or a file it lists does not exist; check the name and the revision"
    if status is not None and 400 <= status < 500 and status not in TRANSIENT_STATUS:
        return f"the Hub refused to read {what} ({status}); check the name and the revision"
    return f"the Hub answered {status or 'an error'} while reading {what}; try again later"


def is_unreachable(error: BaseException) -> bool:
    """A transport failure (no connection, a timeout): the Hub never answered. The client's
    transport errors differ between versions, hence the names."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # the Hub unreachable, no copy

    name = type(error).__name__
    return (
        isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError))
        or "Timeout" in name
        or "Connect" in name
    )


def read_failed(error: BaseException, what: str) -> str:
    """Reading or downloading ``what`` raised ``error``, which is not one of the client's
    named errors (those get their own sentences where they are caught)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return answered(error.response.status_code if error.response is not None else None, what)
    if is_unreachable(error):
        return f"could not reach the Hub to read {what} ({type(error).__name__}); check the network and try again"
    if isinstance(error, OSError) and error.errno is not None:  # the disk, not the Hub
        reason = error.strerror or type(error).__name__
        return f"reading {what} failed writing to disk ({reason}); free disk space and try again"
    return f"the Hub's files of {what} could not be read ({type(error).__name__}: {excerpt(str(error), 120)}); the repo may be damaged at that revision: pin another revision, or tell its owner"
