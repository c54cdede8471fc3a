"""Text that a request controls, put into Markdown (a model card, a discussion reply, the
Space) so that it shows as the characters typed and never as markup: no HTML element, no link,
no emphasis, no table cell or code fence ended early.

One helper per kind of place: :func:`text` for prose (every Markdown and HTML character
escaped), :func:`code` for an inline code span and :func:`code_block` for a fenced block (each
fenced by more backticks than the longest run inside). A table cell takes ``text`` or
``code(..., table=True)``: a ``|`` ends a cell even inside a code span. HTML (``gr.HTML``)
takes :func:`html.escape`.
"""

from __future__ import annotations

import html
import re

_MARKUP = re.compile(r"([\\`*_{}\[\]#|~!])")
"""Characters that start Markdown syntax; ``<``, ``>`` and ``&`` become HTML entities."""
_BACKTICKS = re.compile(r"`+")


def text(value: object) -> str:
    """``value`` as Markdown prose that shows every character of it: no HTML tag
    (``<stream end>``), link or emphasis made from it; its line breaks kept."""
    escaped = _MARKUP.sub(r"\\\1", html.escape(str(value), quote=False))
    return "  \n".join(line.strip() for line in escaped.splitlines())


def cell(value: object) -> str:
    """``value`` as prose on one line, for a table cell or header."""
    return text(" ".join(str(value).splitlines()))


def _fence(value: str, shortest: int) -> str:
    longest = max((len(run) for run in _BACKTICKS.findall(value)), default=0)
    return "`" * max(shortest, longest + 1)


def code(value: object, table: bool = False) -> str:
    """``value`` as an inline code span on one line; with ``table``, for a table cell."""
    value = " ".join(str(value).splitlines())
    if table:
        value = value.replace("|", "\\|")
    fence = _fence(value, 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def code_block(value: object, language: str = "") -> str:
    """``value`` as a fenced code block that no line of it can close."""
    value = str(value).rstrip()
    fence = _fence(value, 3)
    return f"{fence}{language}\n{value}\n{fence}"
