"""What Markdown that the bot publishes (a card, a reply) renders to, as a CommonMark renderer
that passes raw HTML through and reads tables shows it: the elements that a hostile string in a
request must never become."""

from __future__ import annotations

from html.parser import HTMLParser

from markdown_it import MarkdownIt

HOSTILE = (
    "<img src=x onerror=alert(1)> [Claim free GPU credits](https://evil.example) "
    '<a href="javascript:alert(1)">x</a>'
)
"""Markup a request may carry in any string: an image with a script, a disguised link, a
script link."""

_RENDERER = MarkdownIt("commonmark", {"html": True}).enable("table")


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = " ".join(value or "" for _, value in attrs)
        if tag == "img" or (tag == "a" and ("evil.example" in values or "javascript:" in values)):
            self.found.append(f"<{tag} {values}>")


def hostile_elements(markdown: str) -> list[str]:
    """The images, and the links to evil.example or ``javascript:``, that ``markdown`` renders
    to (none of which a bot's card or reply holds of its own)."""
    elements = _Elements()
    elements.feed(_RENDERER.render(markdown))
    return elements.found
