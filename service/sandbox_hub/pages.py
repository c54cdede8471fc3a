"""The sandbox hub's HTML pages for people: a model's page (its card rendered, its files with
sizes) and the root page listing the repos, as a browser opening the demo's links sees them.

The card is Markdown written from requesters' recipes, so it is rendered safely: raw HTML in it
is shown as text, never interpreted, links with ``javascript:``-like schemes stay text, and the
pages carry a Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

from markdown_it import MarkdownIt

HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src http: https:",
    "X-Content-Type-Options": "nosniff",
}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #1f2328; }
header { border-bottom: 1px solid #d0d7de; margin-bottom: 1rem; }
header a { color: inherit; }
table { border-collapse: collapse; margin: 1rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left; }
td.size { text-align: right; white-space: nowrap; }
code, pre { background: #f6f8fa; border-radius: 4px; }
pre { padding: 0.75rem; overflow-x: auto; }
.badge { font-size: 0.8rem; border: 1px solid #d0d7de; border-radius: 1rem; padding: 0 0.5rem; }
"""

_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def _markdown() -> MarkdownIt:
    # "commonmark" with html off: any HTML in the card is escaped; tables as the Hub shows them.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def render_card(card: str) -> tuple[str, str | None]:
    """The card's body as HTML, and its YAML metadata block (None when it has none)."""
    match = _FRONT_MATTER.match(card)
    metadata = match[1] if match else None
    body = card[match.end() :] if match else card
    return _markdown().render(body), metadata


def size_text(size: int) -> str:
    """A file size as the Hub shows it: bytes, then kB, MB, GB (powers of 1000)."""
    if size < 1000:
        return f"{size} Bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def _page(title: str, body: str) -> bytes:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        '<header><p><a href="/">sandbox hub</a></p></header>\n'
        f"{body}\n</body></html>\n"
    ).encode()


def model_page(
    repo_id: str, private: bool, revision: str, card: str | None, files: list[tuple[str, int]]
) -> bytes:
    """``repo_id``'s page at commit ``revision``: its card rendered (or a note that it has
    none) and ``files`` as (path, size in bytes)."""
    badge = ' <span class="badge">private</span>' if private else ""
    parts = [f"<h1>{html.escape(repo_id)}{badge}</h1>"]
    if card is None:
        parts.append("<p>This model has no model card (README.md).</p>")
    else:
        rendered, metadata = render_card(card)
        parts.append(f'<article class="card">\n{rendered}</article>')
        if metadata:
            parts.append(
                "<details><summary>Card metadata</summary>"
                f"<pre><code>{html.escape(metadata)}</code></pre></details>"
            )
    rows = "\n".join(
        f'<tr><td><a href="/{quote(repo_id)}/resolve/{quote(revision)}/{quote(path)}">'
        f'{html.escape(path)}</a></td><td class="size">{size_text(size)}</td></tr>'
        for path, size in files
    )
    parts.append(
        f"<h2>Files</h2>\n<p>At commit <code>{html.escape(revision)}</code>.</p>\n"
        + (
            f"<table><thead><tr><th>file</th><th>size</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table>"
            if files
            else "<p>No files yet.</p>"
        )
    )
    return _page(repo_id, "\n".join(parts))


def index_page(repos: list[tuple[str, str, bool, str]], user: str | None) -> bytes:
    """The root page: ``repos`` as (type, id, private, last updated), each with a link to its
    page for models; ``user`` is whom the private ones are shown to."""
    who = (
        f"Public repos, and the private ones of {html.escape(user)}."
        if user
        else "Public repos (private ones are listed to their owner only)."
    )
    rows = "\n".join(
        "<tr><td>"
        + (
            f'<a href="/{quote(repo_id)}">{html.escape(repo_id)}</a>'
            if repo_type == "model"
            else html.escape(repo_id)
        )
        + (' <span class="badge">private</span>' if private else "")
        + f"</td><td>{html.escape(repo_type)}</td><td>{html.escape(updated)}</td></tr>"
        for repo_type, repo_id, private, updated in repos
    )
    table = (
        "<table><thead><tr><th>repo</th><th>type</th><th>last updated (UTC)</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody></table>"
        if repos
        else "<p>No repos yet.</p>"
    )
    return _page("sandbox hub", f"<h1>Sandbox hub</h1>\n<p>{who}</p>\n{table}")
