"""The sandbox hub's data: repos made of commits, commits mapping paths to git blob ids, blobs.

In memory for tests, or in a folder (``state.json`` plus one file per blob) so a demo
survives a restart. Every write goes through :meth:`HubStore.commit`, which is atomic: a
commit is either wholly applied or not at all.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def blob_id(data: bytes) -> str:
    """The git blob SHA-1 the Hub uses as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]
    """path → blob id: the whole tree at this commit."""
    title: str
    message: str
    author: str
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    discussions: list[dict[str, Any]] = field(default_factory=list)
    """Each as the Hub's discussion details answer it: summary fields plus ``events``."""

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit id → that commit."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commits, commit = [], self.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return commits


class ConflictError(Exception):
    """The commit's parent is not the branch head any more."""


Listener = Callable[[str, str, "Repo", dict[str, Any]], None]
"""Called with (scope, action, repo, details) after every change, as a webhook would report it."""


class HubStore:
    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.repos: dict[tuple[str, str], Repo] = {}
        self.listeners: list[Listener] = []
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        if folder is not None:
            (folder / "blobs").mkdir(parents=True, exist_ok=True)
            self._load()

    # --- persistence ----------------------------------------------------------------------

    def _load(self) -> None:
        state = self.folder / "state.json"
        if not state.is_file():
            return
        for data in json.loads(state.read_text()):
            commits = {oid: Commit(**c) for oid, c in data.pop("commits").items()}
            repo = Repo(**data, commits=commits)
            self.repos[(repo.repo_type, repo.repo_id)] = repo

    def _save(self) -> None:
        if self.folder is None:
            return
        data = [asdict(repo) for repo in self.repos.values()]
        temporary = self.folder / "state.json.tmp"
        temporary.write_text(json.dumps(data))
        temporary.replace(self.folder / "state.json")

    def blob(self, oid: str) -> bytes:
        if self.folder is None:
            return self._blobs[oid]
        return (self.folder / "blobs" / oid).read_bytes()

    def _put_blob(self, data: bytes) -> str:
        oid = blob_id(data)
        if self.folder is None:
            self._blobs[oid] = data
        elif not (self.folder / "blobs" / oid).exists():
            (self.folder / "blobs" / oid).write_bytes(data)
        return oid

    # --- repos and commits ------------------------------------------------------------------

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create(self, repo_type: str, repo_id: str, owner: str, private: bool) -> tuple[Repo, bool]:
        """The repo, and whether it was created now (False: it existed)."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return self.repos[(repo_type, repo_id)], False
            repo = Repo(repo_type, repo_id, owner, private)
            self.repos[(repo_type, repo_id)] = repo
            self._commit(repo, "main", None, {}, [], "initial commit", "", owner)
            self._notify("repo", "create", repo, {})
            return repo, True

    def delete(self, repo_type: str, repo_id: str) -> bool:
        with self._lock:
            removed = self.repos.pop((repo_type, repo_id), None) is not None
            self._save()
            return removed

    def commit(
        self,
        repo: Repo,
        branch: str,
        parent: str | None,
        files: dict[str, bytes],
        deleted: list[str],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        with self._lock:
            return self._commit(repo, branch, parent, files, deleted, title, message, author)

    def _commit(self, repo, branch, parent, files, deleted, title, message, author) -> Commit:
        head = repo.branches.get(branch)
        if parent is not None and parent != head:
            raise ConflictError(f"parent commit {parent} is not the head of {branch}")
        tree = dict(repo.commits[head].files) if head else {}
        for path in deleted:
            tree = {
                p: o
                for p, o in tree.items()
                if p != path and not p.startswith(path.rstrip("/") + "/")
            }
        for path, data in files.items():
            tree[path] = self._put_blob(data)
        date = time.time()
        oid = hashlib.sha1(
            json.dumps([head, sorted(tree.items()), title, message, date]).encode()
        ).hexdigest()
        commit = Commit(oid, head, tree, title, message, author, date)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        self._save()
        ref = {"ref": f"refs/heads/{branch}", "oldSha": head, "newSha": oid}
        self._notify("repo.content", "update", repo, {"updatedRefs": [ref]})
        return commit

    # --- discussions ------------------------------------------------------------------------

    def open_discussion(self, repo: Repo, title: str, description: str, author: str) -> dict:
        with self._lock:
            discussion = {
                "num": len(repo.discussions) + 1,
                "title": title,
                "status": "open",
                "author": {"name": author},
                "createdAt": _now(),
                "isPullRequest": False,
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "events": [],
            }
            repo.discussions.append(discussion)
            self._event(repo, discussion, "comment", author, comment_data(description))
            self._notify("discussion", "create", repo, {"discussion": discussion})
            return discussion

    def discussion_event(
        self, repo: Repo, num: int, kind: str, author: str, data: dict[str, Any]
    ) -> dict:
        """Add a ``comment``, ``status-change`` or ``title-change`` event to discussion ``num``."""
        with self._lock:
            discussion = repo.discussions[num - 1]
            if kind == "status-change":
                discussion["status"] = data["status"]
            elif kind == "title-change":
                discussion["title"] = data["to"]
            event = self._event(repo, discussion, kind, author, data)
            scope = "discussion.comment" if kind == "comment" else "discussion"
            details = {"discussion": discussion, "comment": event if kind == "comment" else None}
            self._notify(scope, "create" if kind == "comment" else "update", repo, details)
            return event

    def _event(self, repo: Repo, discussion: dict, kind: str, author: str, data: dict) -> dict:
        number = sum(len(d["events"]) for d in repo.discussions) + 1
        event = {
            "id": f"{repo.repo_id}#{discussion['num']}/{number}",
            "type": kind,
            "createdAt": _now(),
            "author": {"name": author},
            "data": data,
        }
        discussion["events"].append(event)
        self._save()
        return event

    def _notify(self, scope: str, action: str, repo: Repo, details: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(scope, action, repo, details)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def comment_data(text: str) -> dict[str, Any]:
    return {"edited": False, "hidden": False, "latest": {"raw": text, "html": text}}
