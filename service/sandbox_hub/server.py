"""A Hub-compatible HTTP server on 127.0.0.1 that the unmodified ``huggingface_hub`` client
and ``transformers`` talk to through ``HF_ENDPOINT`` (see shared/docs/hub-contract.md).

Covered: whoami, repo create/delete, repo info, refs, commits, tree, resolve (HEAD and GET,
with ``Range``), preupload and commit (so ``upload_folder`` works), validate-yaml, HTML pages
for people (a model's page with its card rendered and its files, and ``/`` listing the repos;
see ``pages``), and in
``community``: discussions (list, open, details, comment, status, title) and webhooks.
Every request's path and token are recorded in ``SandboxHub.requests`` so tests can check
which files were read and with which token. For outage tests, ``SandboxHub.fail`` answers
errors, ``SandboxHub.slow`` delays answers, and ``SandboxServer.go_down``/``come_back`` refuse
connections for a while on the same port.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from service.sandbox_hub import pages
from service.sandbox_hub.community import Community
from service.sandbox_hub.exchange import Request, Response
from service.sandbox_hub.store import Commit, ConflictError, HubStore, Repo

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    token: str | None
    range: str | None


class SandboxHub:
    """The routes and their state. ``users`` maps a token to a user name."""

    def __init__(self, store: HubStore | None = None, users: dict[str, str] | None = None):
        self.store = store or HubStore()
        self.users = users or {}
        self.requests: list[RecordedRequest] = []
        self.faults: list[list] = []  # [method, path regex, status, times left]
        self.delays: list[list] = []  # [seconds, method or None, path regex or None, times left]
        self.fault_lock = threading.Lock()
        self.routes: list[tuple[str, re.Pattern[str], Callable[[Request], Response]]] = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("DELETE", r"/api/repos/delete", self.delete_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/refs", self.refs),
            (
                "GET",
                r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/commits/(?P<rev>[^/]+)",
                self.commits,
            ),
            (
                "GET",
                r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?",
                self.tree,
            ),
            (
                "POST",
                r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)",
                self.preupload,
            ),
            (
                "POST",
                r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)",
                self.commit,
            ),
            (
                "GET",
                r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?",
                self.repo_info,
            ),
            (
                "GET",
                r"/(?:(?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
                self.resolve,
            ),
            (
                "HEAD",
                r"/(?:(?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
                self.resolve,
            ),
        ]
        self.routes.append(("GET", r"/(?!api/)(?P<repo>[^/]+/[^/]+)", self.model_page))
        self.routes.append(("GET", r"", self.index_page))
        self.community = Community(self)
        self.store.listeners.append(self.community.notify)
        self.routes += self.community.routes()
        self.routes = [(m, re.compile(p + r"/?$"), h) for m, p, h in self.routes]

    # --- dispatch -------------------------------------------------------------------------

    def fail(self, method: str, path: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` regex with ``status``."""
        self.faults.append([method, re.compile(path), status, times])

    def slow(
        self,
        seconds: float,
        method: str | None = None,
        path: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer requests matching ``method`` and the ``path`` regex (any, when None) only after
        ``seconds``: the next ``times`` of them, or all of them when ``times`` is None. Other
        requests are answered meanwhile, each in its own thread."""
        self.delays.append([seconds, method, re.compile(path) if path else None, times])

    def handle(self, request: Request) -> Response:
        self.requests.append(
            RecordedRequest(
                request.method, request.path, request.token, request.headers.get("range")
            )
        )
        delay, fault = 0.0, None
        with self.fault_lock:
            for rule in self.delays:
                seconds, method, path, times = rule
                if (
                    (times is None or times > 0)
                    and method in (None, request.method)
                    and (path is None or path.search(request.path))
                ):
                    delay += seconds
                    rule[3] = None if times is None else times - 1
            for rule in self.faults:
                if rule[3] > 0 and rule[0] == request.method and rule[1].search(request.path):
                    rule[3] -= 1
                    fault = rule
                    break
        if delay:
            time.sleep(delay)
        if fault is not None:
            return Response.error(fault[2], None, "injected fault")
        for method, pattern, handler in self.routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                request.params = {
                    k: unquote(v) for k, v in match.groupdict().items() if v is not None
                }
                return handler(request)
        return Response.error(404, None, f"no route for {request.method} {request.path}")

    def user(self, request: Request) -> str | None:
        return self.users.get(request.token) if request.token else None

    def find_repo(self, request: Request, write: bool = False) -> Repo | Response:
        """The repo the request names if its user may read it (or, with ``write``, write to
        it); otherwise the error to answer, a 404 for a private repo as the Hub does."""
        repo_type = REPO_TYPES[request.params.get("t") or "models"]
        repo = self.store.get(repo_type, request.params["repo"])
        user = self.user(request)
        if repo is None or (repo.private and user != repo.owner) or (write and user != repo.owner):
            if write and repo is not None and not repo.private:
                return Response.error(403, None, f"you cannot write to {request.params['repo']}")
            return Response.error(
                404, "RepoNotFound", f"Repository Not Found for url: {request.path}."
            )
        return repo

    def _repo_at(self, request: Request) -> tuple[Repo, Commit] | Response:
        """The readable repo and the commit its revision names, or the error to answer."""
        repo = self.find_repo(request)
        if isinstance(repo, Response):
            return repo
        revision = request.params.get("rev") or "main"
        commit = repo.resolve(revision)
        if commit is None:
            return Response.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    # --- routes -----------------------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return Response.error(401, None, "Invalid credentials in Authorization header")
        return Response.of(
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "sandbox", "role": "write"},
                },
            }
        )

    def create_repo(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return Response.error(401, None, "Invalid credentials in Authorization header")
        body = request.json()
        namespace = body.get("organization") or user
        if namespace != user:
            return Response.error(403, None, f"you cannot create repos under {namespace}")
        repo_type = body.get("type") or "model"
        repo_id = f"{namespace}/{body['name']}"
        private = (
            bool(body.get("private")) or body.get("visibility") == "private"
        )  # 2.4 sends visibility
        _, created = self.store.create(repo_type, repo_id, user, private)
        return Response.of({"url": f"/{repo_id}"}, 200 if created else 409)

    def delete_repo(self, request: Request) -> Response:
        body = request.json()
        repo_id = f"{body.get('organization') or self.user(request)}/{body['name']}"
        repo = self.store.get(body.get("type") or "model", repo_id)
        if repo is None or repo.owner != self.user(request):
            return Response.error(404, "RepoNotFound", f"Repository Not Found: {repo_id}")
        self.store.delete(repo.repo_type, repo_id)
        return Response.of({})

    def validate_yaml(self, request: Request) -> Response:
        content = request.json().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        metadata = yaml.safe_load(match[1]) if match else {}
        base = (metadata or {}).get("base_model")
        for ref in [base] if isinstance(base, str) else base or []:
            if not re.match(r"^[\w.-]+/[\w.-]+$", str(ref)):
                return Response.of(
                    {"errors": [{"message": f'"base_model" must be a Hub repo id, got "{ref}"'}]},
                    400,
                )
        return Response.of({"errors": [], "warnings": []})

    def repo_info(self, request: Request) -> Response:
        found = self._repo_at(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        return Response.of(
            {
                "id": repo.repo_id,
                "author": repo.owner,
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "cardData": {},
                "siblings": [
                    {"rfilename": p, "size": len(self.store.blob(o))}
                    for p, o in sorted(commit.files.items())
                ],
            }
        )

    def refs(self, request: Request) -> Response:
        repo = self.find_repo(request)
        if isinstance(repo, Response):
            return repo
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
            for n, oid in repo.branches.items()
        ]
        return Response.of({"branches": branches, "converts": [], "tags": []})

    def commits(self, request: Request) -> Response:
        repo = self.find_repo(request)
        if isinstance(repo, Response):
            return repo
        if repo.resolve(request.params["rev"]) is None:
            return Response.error(
                404, "RevisionNotFound", f"Invalid rev id: {request.params['rev']}"
            )
        return Response.of(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": _iso(c.date),
                    "authors": [{"user": c.author}],
                }
                for c in repo.history(request.params["rev"])
            ]
        )

    def tree(self, request: Request) -> Response:
        found = self._repo_at(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        prefix = request.params.get("path", "").strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, oid in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": oid})
            if recursive or len(parts) == 1:
                entries.append(
                    {"type": "file", "path": path, "size": len(self.store.blob(oid)), "oid": oid}
                )
        return Response.of(entries)

    def resolve(self, request: Request) -> Response:
        found = self._repo_at(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        oid = commit.files.get(request.params["path"])
        headers = {"X-Repo-Commit": commit.oid}
        if oid is None:
            return Response.error(
                404,
                "EntryNotFound",
                f"{request.params['path']} does not exist at {commit.oid}",
                **headers,
            )
        data = self.store.blob(oid)
        headers.update(
            {
                "ETag": f'"{oid}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
        )
        status, body = 200, data
        match = re.match(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
        if match:
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        response = Response(status, body, headers)
        if request.method == "HEAD":
            response.headers["Content-Length"] = str(len(body))
            response.body = b""
        return response

    def model_page(self, request: Request) -> Response:
        """A model's page, as the links in the Space and in discussion replies open it: its
        card rendered as HTML (safely: no HTML from the card is interpreted) and its files with
        their sizes. A private repo is there for its owner's token only, as everywhere."""
        found = self._repo_at(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        oid = commit.files.get("README.md")
        card = self.store.blob(oid).decode("utf-8", errors="replace") if oid else None
        files = [(p, len(self.store.blob(o))) for p, o in sorted(commit.files.items())]
        body = pages.model_page(repo.repo_id, repo.private, commit.oid, card, files)
        return Response(200, body, dict(pages.HEADERS))

    def index_page(self, request: Request) -> Response:
        """``/``: every public repo, and the private ones of the token's user, newest first."""
        user = self.user(request)
        repos = [
            repo
            for repo in list(self.store.repos.values())
            if not repo.private or (user is not None and repo.owner == user)
        ]

        def updated(repo: Repo) -> float:
            head = repo.resolve("main") or next(iter(repo.commits.values()), None)
            return head.date if head else 0.0

        repos.sort(key=lambda r: (-updated(r), r.repo_type, r.repo_id))
        rows = [
            (r.repo_type, r.repo_id, r.private, _iso(updated(r))[:19].replace("T", " "))
            for r in repos
        ]
        return Response(200, pages.index_page(rows, user), dict(pages.HEADERS))

    def preupload(self, request: Request) -> Response:
        repo = self.find_repo(request, write=True)
        if isinstance(repo, Response):
            return repo
        head = repo.resolve(request.params["rev"])
        existing = head.files if head else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                **({"oid": existing[f["path"]]} if f["path"] in existing else {}),
            }
            for f in request.json().get("files", [])
        ]
        return Response.of({"files": files})

    def commit(self, request: Request) -> Response:
        repo = self.find_repo(request, write=True)
        if isinstance(repo, Response):
            return repo
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in request.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return Response.error(
                    400, None, f"the sandbox hub does not support {item['key']} in a commit"
                )
        branch = request.params["rev"]
        try:
            commit = self.store.commit(
                repo,
                branch,
                header.get("parentCommit"),
                files,
                deleted,
                header.get("summary", ""),
                header.get("description", ""),
                self.user(request) or "",
            )
        except ConflictError as error:
            return Response.error(412, None, str(error))
        return Response.of(
            {"commitUrl": f"/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid}
        )


def _iso(timestamp: float) -> str:
    import datetime

    return (
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        body = b"".join(chunks)
    else:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    if handler.headers.get("Content-Encoding", "").lower() == "gzip":
        body = gzip.decompress(body)
    return body


def make_handler(hub: SandboxHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            auth = self.headers.get("Authorization", "")
            request = Request(
                self.command,
                unquote(url.path) if "/resolve/" not in url.path else url.path,
                parse_qs(url.query),
                {k.lower(): v for k, v in self.headers.items()},
                _read_body(self),
                auth.removeprefix("Bearer ").strip() or None,
            )
            try:
                response = hub.handle(request)
            except Exception as error:  # a sandbox bug must answer, not hang the client
                response = Response.error(
                    500, None, f"sandbox hub error: {type(error).__name__}: {error}"
                )
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            if "Content-Length" not in response.headers:
                self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Date", formatdate(usegmt=True))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:  # tokens must never reach a log
            pass

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    """Keeps its open connections, so that an outage can cut them, and is quiet about the
    errors that a cut connection raises in a handler thread still answering on it."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:  # in the serving thread, so a shutdown() sees every one
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a cut connection is not a bug
            super().handle_error(request, client_address)


class SandboxServer:
    """The sandbox hub serving on 127.0.0.1 in a background thread; ``port=0`` picks a free port."""

    def __init__(self, hub: SandboxHub | None = None, port: int = 0, folder: Path | None = None):
        self.hub = hub or SandboxHub(HubStore(folder))
        self._listen(port)
        self.port: int = self.httpd.server_address[1]
        self.down = False
        self.hub.community.base_url = self.url

    def _listen(self, port: int) -> None:
        self.httpd = _HTTPServer(("127.0.0.1", port), make_handler(self.hub))
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="sandbox-hub", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SandboxServer:
        self.thread.start()
        return self

    def go_down(self) -> None:
        """An outage: the listening socket closes, so new connections are refused
        (ECONNREFUSED), and open connections are cut; a handler still inside a request (a
        ``slow`` one) finishes against its cut connection. ``come_back`` ends the outage."""
        if not self.down:
            self.down = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.httpd.cut_connections()

    def come_back(self) -> None:
        """Listen again on the same port, with the same hub and its state."""
        if self.down:
            self._listen(self.port)
            self.down = False
            self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.go_down()
