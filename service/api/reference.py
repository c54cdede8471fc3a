"""The JSON API's reference as one self-contained HTML page, made from the OpenAPI schema.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so offline (the demo, a machine without
internet) it is a blank page. This page needs nothing but itself: every call, what it does, its
parameters and the fields of its body. The schema stays at ``/api/openapi.json`` for tools.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
h2 { margin-top: 2rem; font-family: ui-monospace, monospace; font-size: 1.05rem; }
.method { display: inline-block; min-width: 4rem; font-weight: bold; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2rem .5rem; }
pre { white-space: pre-wrap; }
"""


def render(schema: dict[str, Any]) -> str:
    """The page for an OpenAPI ``schema``."""
    info = schema.get("info", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{escape(info.get('title', 'API'))} API</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(info.get('title', 'API'))} API</h1>",
        f"<pre>{escape(info.get('description', ''))}</pre>",
        "<p>The machine-readable schema is at <a href='/api/openapi.json'>/api/openapi.json</a>.</p>",
    ]
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(_operation(path, method, operation, schema))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, operation: dict[str, Any], schema: dict[str, Any]) -> str:
    lines = [f"<h2><span class='method'>{escape(method.upper())}</span> {escape(path)}</h2>"]
    if operation.get("description") or operation.get("summary"):
        text = operation.get("description") or operation["summary"]
        lines.append(f"<pre>{escape(text)}</pre>")
    rows = [
        (p["name"], p.get("in", ""), _type(p.get("schema", {}), schema), p.get("required", False))
        for p in operation.get("parameters", [])
    ]
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    body_schema = _resolve(body.get("schema", {}), schema)
    required = set(body_schema.get("required", []))
    rows += [
        (name, "body", _type(field, schema), name in required)
        for name, field in body_schema.get("properties", {}).items()
    ]
    if rows:
        lines.append("<table><tr><th>name</th><th>in</th><th>type</th><th>required</th></tr>")
        lines += [
            f"<tr><td>{escape(n)}</td><td>{escape(w)}</td><td>{escape(t)}</td>"
            f"<td>{'yes' if r else ''}</td></tr>"
            for n, w, t, r in rows
        ]
        lines.append("</table>")
    return "\n".join(lines)


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return node


def _type(node: dict[str, Any], schema: dict[str, Any]) -> str:
    node = _resolve(node, schema)
    if "anyOf" in node:
        return " or ".join(_type(option, schema) for option in node["anyOf"])
    return str(node.get("type", node.get("title", "")))
