"""One request to the sandbox hub and its answer, as the routes (server and community) see them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    token: str | None
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, data: Any, status: int = 200, **headers: str) -> Response:
        return cls(
            status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers}
        )

    @classmethod
    def error(cls, status: int, code: str | None, message: str, **headers: str) -> Response:
        extra = {"X-Error-Code": code} if code else {}
        return cls.of(
            {"error": message}, status, **extra, **headers, **{"X-Error-Message": message}
        )
