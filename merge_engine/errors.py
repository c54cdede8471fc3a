"""Every failure a user can cause, one class each, each carrying one sentence that names the
thing and the fix.

    MergeError                      anything the engine refuses; str() is the user's sentence
    ├── RecipeError                 the recipe itself is wrong (field, value, method, parameter)
    ├── SourceError                 a model reference cannot be read (missing folder, repo, file)
    │   └── UnsafeCheckpointError   only pickle weights, and pickles were not allowed
    ├── IncompatibleModelsError     models differ in tensor names, shapes, vocab or layer count
    └── OutputExistsError           the output folder already holds something

The CLI prints ``str(error)`` and exits 1; the service will map the same classes to replies.
"""

from __future__ import annotations


def excerpt(value: object, limit: int = 60) -> str:
    """``repr(value)`` when a string of at most ``limit`` characters (or a repr that short),
    else its start, "…" and the total length: how a message quotes what a user wrote, so that
    a huge field never comes back whole in an error."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{repr(value[:limit])[:-1]}… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class MergeError(Exception):
    """Base class: the message is a complete sentence meant for the person who ran the merge."""


class RecipeError(MergeError, ValueError):
    """The recipe is invalid. ``field`` is a dotted path into the YAML (e.g. ``models[1].parameters.density``)."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class SourceError(MergeError, FileNotFoundError):
    """A model reference, file or tensor could not be found or read."""


class UnsafeCheckpointError(SourceError):
    """A model ships pickle weights only and the caller did not allow loading them."""


class IncompatibleModelsError(MergeError, ValueError):
    """The input models cannot be merged tensor by tensor."""


class OutputExistsError(MergeError, FileExistsError):
    """The output folder is not empty."""
