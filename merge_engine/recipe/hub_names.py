"""Repo ids and revisions checked by the Hub's own rules before any Hub call, so that a name
the Hub would refuse gets one sentence naming it and the fix, not "could not reach the Hub";
and whether a Hub address is this machine (the offline demo's sandbox hub)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from merge_engine.errors import RecipeError, excerpt

REPO_ID_RULES = (
    "letters, digits, '-', '_' and '.', no '--' or '..', not starting or ending with '-' or '.', "
    "at most 96 characters per part, not ending in '.git'"
)
REVISION_RULES = (
    "at most 255 characters, no spaces, control characters, '..', '@{', "
    "'//' or any of ~^:?*[\\, not starting with '-' or '/', not ending with '/', '.' or '.lock'"
)
MAX_REVISION_CHARS = 255
# git check-ref-format's rules: the characters and sequences a ref name may not hold anywhere...
_REVISION_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
# ...and how it may not start or end.
_REVISION_ENDS = re.compile(r"^[-/]|(?:/|\.|\.lock)\Z")


def check_repo_id(name: str, what: str, field: str | None = None) -> None:
    """Refuse ``name`` unless it is ``namespace/name`` as the Hub accepts it; ``what`` names
    the thing in the sentence ("model", "dataset", "target")."""
    from huggingface_hub.errors import HFValidationError  # only when a name is checked
    from huggingface_hub.utils import validate_repo_id

    valid = isinstance(name, str) and name.count("/") == 1
    if valid:
        try:
            validate_repo_id(name)
        except HFValidationError:
            valid = False
    if not valid:
        raise RecipeError(
            f"{what} {excerpt(name)} is not a name the Hub accepts as namespace/name "
            f"({REPO_ID_RULES}); fix the name",
            field=field,
        )


def check_revision(revision: str, field: str | None = None) -> None:
    """Refuse a revision git and the Hub would not take: git's ref-name rules (``main``,
    ``v1.0``, ``refs/pr/1``), which every commit SHA also meets."""
    if (
        not isinstance(revision, str)
        or not 0 < len(revision) <= MAX_REVISION_CHARS
        or _REVISION_FORBIDDEN.search(revision)
        or _REVISION_ENDS.search(revision)
    ):
        raise RecipeError(
            f"revision {excerpt(revision)} is not a branch, tag or commit name git accepts "
            f"({REVISION_RULES}); fix the revision",
            field=field,
        )


def is_loopback(endpoint: str) -> bool:
    """Whether the Hub at ``endpoint`` runs on this machine: the sandbox hub, which holds the
    demo's models and no Spaces."""
    return (urlsplit(endpoint).hostname or "") in ("127.0.0.1", "localhost", "::1")
