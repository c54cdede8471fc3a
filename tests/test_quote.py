"""The quoting helpers that put request text into cards and replies: whatever the text, the
Markdown renders no element from it, keeps its table shape and shows every character."""

from __future__ import annotations

import pytest
from markdown_it import MarkdownIt
from rendered import HOSTILE, hostile_elements

from merge_engine.recipe import quote

NASTY = [HOSTILE, f"a | b ``` {HOSTILE}", f"x` {HOSTILE} `y", f"line one\n```\n{HOSTILE}\n```"]


@pytest.mark.parametrize("value", NASTY)
def test_no_element_is_made_from_quoted_text(value):
    for markdown in (quote.text(value), quote.code(value), quote.code_block(value, "yaml")):
        assert hostile_elements(markdown) == [], markdown


@pytest.mark.parametrize("value", NASTY)
def test_a_quoted_cell_keeps_the_table_shape(value):
    row = f"| {quote.cell(value)} | {quote.code(value, table=True)} | 1 |"
    table = "\n".join(["| a | b | c |", "|---|---|---|", row])
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(table)
    assert html.count("<td") == 3 and hostile_elements(table) == [], html


def test_a_code_block_is_longer_than_any_fence_inside():
    block = quote.code_block("a\n````\nb")
    assert block.startswith("`````\n") and block.endswith("\n`````")
    assert quote.code("echo `date`") == "`` echo `date` ``"
    assert quote.text("<b>_x_</b>") == "&lt;b&gt;\\_x\\_&lt;/b&gt;"
