"""A pattern a user wrote (a recipe's ``discard:``), read and matched with bounded work.

Python's ``re`` backtracks: a pattern with nested quantifiers such as ``([\\w.]+)+!`` takes
time exponential in the name it is matched against, inside C code that holds the GIL, so one
request would stop every thread of the server. User patterns therefore run on RE2, which
matches in time linear in the name and compiles within :data:`PROGRAM_BYTES` of memory; and how
many patterns a recipe holds and how long each is are checked before any is compiled.

RE2 reads Python's syntax except what needs backtracking (lookaround, backreferences) and
``\\Z`` (RE2 writes it ``\\z``); ``\\w`` and ``\\d`` are ASCII, as tensor names are. A pattern
is matched as ``re.search`` does: anywhere in the name unless anchored with ``^``/``$``.
"""

from __future__ import annotations

from collections.abc import Sequence

import re2

from merge_engine.errors import excerpt
from merge_engine.recipe.limits import RecipeLimits

PROGRAM_BYTES = 4 << 20
"""Memory RE2 may use for one compiled pattern (its default is 8 MiB)."""

_OPTIONS = re2.Options()
_OPTIONS.max_mem = PROGRAM_BYTES
_OPTIONS.log_errors = False  # RE2 would print every refused pattern to stderr

_INSTEAD = {
    "lookaround": (
        "uses lookaround ((?=, (?!, (?<= or (?<!), which patterns cannot hold because they run "
        "in linear time; list what to leave out instead, e.g. '^first_stage_model\\.'"
    ),
    "backreference": (
        "uses a backreference (\\1 or (?P=name)), which patterns cannot hold because they run "
        "in linear time; write the repeated text out"
    ),
    "\\Z": "uses \\Z, which patterns write as $ (the end of the name); write $ instead",
}


def count_error(patterns: Sequence[object], limits: RecipeLimits) -> str | None:
    """The sentence refusing a list of more patterns than ``limits`` allow, or None."""
    if len(patterns) <= limits.max_patterns:
        return None
    return (
        f"has {len(patterns):,} patterns, more than the {limits.max_patterns:,} allowed; "
        "join patterns with | or leave out fewer tensors"
    )


def compile_pattern(pattern: str, max_chars: int | None = None) -> re2._Regexp:
    """``pattern`` compiled by RE2; ValueError with one sentence when it is longer than
    ``max_chars`` (checked first), is not a pattern RE2 runs, or matches every name."""
    if max_chars is not None and len(pattern) > max_chars:
        raise ValueError(
            f"is {len(pattern):,} characters long, more than the {max_chars:,} allowed for one "
            "pattern; shorten it"
        )
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as error:
        raise ValueError(_compile_error(pattern, error)) from None
    if compiled.search("") is not None:
        raise ValueError(
            f"{excerpt(pattern)} matches an empty name, so it matches every tensor name; "
            "write a pattern that matches only the names to leave out"
        )
    return compiled


def _compile_error(pattern: str, error: re2.error) -> str:
    reason = error.args[0] if error.args else ""
    reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    kind = _unsupported(pattern, reason)
    if kind is not None:
        return f"{excerpt(pattern)} {_INSTEAD[kind]}"
    if reason.startswith("pattern too large"):
        return (
            f"{excerpt(pattern)} needs more than {PROGRAM_BYTES >> 20} MiB once compiled; "
            "simplify it (fewer or smaller repeats)"
        )
    return (
        f"{excerpt(pattern)} is not a regular expression ({excerpt(reason, 80)}); fix it, or "
        "put \\ before a character meant literally"
    )


def _unsupported(pattern: str, reason: str) -> str | None:
    """Which of Python's backtracking features RE2 refused, from its error message."""
    operator = reason.removeprefix("invalid perl operator: ")
    if operator.startswith(("(?=", "(?!", "(?<=", "(?<!")):
        return "lookaround"
    if operator.startswith("(?P") and "(?P=" in pattern:  # RE2 quotes only "(?P"
        return "backreference"
    escaped = reason.removeprefix("invalid escape sequence: \\")
    if escaped != reason and escaped[:1].isdigit():
        return "backreference"
    return "\\Z" if escaped == "Z" else None


class NameFilter:
    """Whether a name matches any of ``patterns`` (``re.search`` semantics); their count and
    lengths were checked when the recipe was read."""

    def __init__(self, patterns: Sequence[str]):
        self._compiled = [compile_pattern(pattern) for pattern in patterns]

    def __call__(self, name: str) -> bool:
        return any(pattern.search(name) for pattern in self._compiled)
