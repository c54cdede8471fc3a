"""Discussions and webhooks of the sandbox hub: what merge-request discussions and "a source
model got a new commit" need. Routes answer as hub-contract.md says; webhooks are delivered
from a background thread with ``X-Webhook-Secret``, each delivery recorded for tests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.sandbox_hub.exchange import Request, Response
from service.sandbox_hub.store import HubStore, Repo, comment_data

_REPO = r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/discussions"


class Hub(Protocol):
    """What the community routes ask of the hub that serves them (the server's ``SandboxHub``,
    which builds its :class:`Community` and so is not imported here)."""

    store: HubStore

    def user(self, request: Request) -> str | None: ...

    def find_repo(self, request: Request, write: bool = False) -> Repo | Response: ...


@dataclass
class Webhook:
    id: str
    url: str
    watched: list[dict[str, str]]
    domains: list[str]
    secret: str | None = None

    def watches(self, repo: Repo, scope: str) -> bool:
        if scope.split(".")[0] not in self.domains:
            return False
        namespace = repo.repo_id.split("/")[0]
        return any(
            (item["type"] == repo.repo_type and item["name"] == repo.repo_id)
            or (item["type"] in ("user", "org") and item["name"] == namespace)
            for item in self.watched
        )


@dataclass
class Delivery:
    webhook: str
    payload: dict[str, Any]
    status: int | None
    """The receiver's HTTP status, or None when it could not be reached."""


@dataclass
class Community:
    hub: Hub
    webhooks: list[Webhook] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    base_url: str = ""
    """Set by the server once it knows its port: webhook payloads carry repo URLs."""

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", _REPO, self.list_discussions),
            ("POST", _REPO, self.create_discussion),
            ("GET", _REPO + r"/(?P<num>\d+)", self.discussion_details),
            ("POST", _REPO + r"/(?P<num>\d+)/(?P<change>comment|status|title)", self.change),
            ("POST", r"/api/settings/webhooks", self.create_webhook),
        ]

    # --- discussions ------------------------------------------------------------------------

    def list_discussions(self, request: Request) -> Response:
        repo = self.hub.find_repo(request)
        if isinstance(repo, Response):
            return repo
        wanted = (request.query.get("status") or ["all"])[0]
        author = (request.query.get("author") or [None])[0]
        found = [
            _summary(d)
            for d in reversed(repo.discussions)
            if wanted in ("all", d["status"]) and author in (None, d["author"]["name"])
        ]
        return Response.of({"discussions": found, "count": len(found), "start": 0})

    def create_discussion(self, request: Request) -> Response:
        user = self.hub.user(request)
        if user is None:
            return Response.error(401, None, "Invalid credentials in Authorization header")
        repo = self.hub.find_repo(request)
        if isinstance(repo, Response):
            return repo
        body = request.json()
        if body.get("pullRequest"):
            return Response.error(400, None, "the sandbox hub has discussions, not pull requests")
        discussion = self.hub.store.open_discussion(
            repo, body["title"], body.get("description") or "", user
        )
        return Response.of({"num": discussion["num"]})

    def discussion_details(self, request: Request) -> Response:
        found = self._discussion(request)
        if isinstance(found, Response):
            return found
        return Response.of({**found[1], "diff": None})

    def change(self, request: Request) -> Response:
        user = self.hub.user(request)
        if user is None:
            return Response.error(401, None, "Invalid credentials in Authorization header")
        found = self._discussion(request)
        if isinstance(found, Response):
            return found
        repo, discussion = found
        body = request.json()
        change = request.params["change"]
        store = self.hub.store
        if change == "comment":
            event = store.discussion_event(
                repo, discussion["num"], "comment", user, comment_data(body["comment"])
            )
            return Response.of({"newMessage": event})
        if user not in (repo.owner, discussion["author"]["name"]):
            return Response.error(403, None, "only the repo owner or the author can do that")
        if change == "status":
            if body.get("comment"):
                store.discussion_event(
                    repo, discussion["num"], "comment", user, comment_data(body["comment"])
                )
            event = store.discussion_event(
                repo, discussion["num"], "status-change", user, {"status": body["status"]}
            )
            return Response.of({"newStatus": event})
        data = {"from": discussion["title"], "to": body["title"]}
        event = store.discussion_event(repo, discussion["num"], "title-change", user, data)
        return Response.of({"newTitle": event})

    def _discussion(self, request: Request) -> tuple[Repo, dict] | Response:
        repo = self.hub.find_repo(request)
        if isinstance(repo, Response):
            return repo
        num = int(request.params["num"])
        if not 1 <= num <= len(repo.discussions):
            return Response.error(404, None, f"Discussion {num} not found")
        return repo, repo.discussions[num - 1]

    # --- webhooks ---------------------------------------------------------------------------

    def create_webhook(self, request: Request) -> Response:
        if self.hub.user(request) is None:
            return Response.error(401, None, "Invalid credentials in Authorization header")
        body = request.json()
        if not body.get("url"):
            return Response.error(400, None, "the sandbox hub delivers webhooks to a url only")
        webhook = Webhook(
            id=f"webhook-{len(self.webhooks) + 1}",
            url=body["url"],
            watched=body["watched"],
            domains=body.get("domains") or ["repo", "discussion"],
            secret=body.get("secret"),
        )
        self.webhooks.append(webhook)
        info = {
            "id": webhook.id,
            "url": webhook.url,
            "watched": webhook.watched,
            "domains": webhook.domains,
            "secret": webhook.secret,
            "disabled": False,
        }
        return Response.of({"webhook": info})

    def notify(self, scope: str, action: str, repo: Repo, details: dict[str, Any]) -> None:
        """The store's listener: deliver the event to every webhook that watches it."""
        for webhook in self.webhooks:
            if webhook.watches(repo, scope):
                payload = self._payload(webhook, scope, action, repo, details)
                threading.Thread(target=self._deliver, args=(webhook, payload), daemon=True).start()

    def _payload(
        self, webhook: Webhook, scope: str, action: str, repo: Repo, details: dict[str, Any]
    ) -> dict[str, Any]:
        web = f"{self.base_url}/{repo.repo_id}"
        payload: dict[str, Any] = {
            "event": {"action": action, "scope": scope},
            "repo": {
                "type": repo.repo_type,
                "name": repo.repo_id,
                "id": repo.repo_id,
                "private": repo.private,
                "owner": {"id": repo.owner},
                "headSha": repo.branches.get("main"),
                "url": {"web": web, "api": f"{self.base_url}/api/{repo.repo_type}s/{repo.repo_id}"},
            },
            "webhook": {"id": webhook.id, "version": 3},
        }
        if details.get("updatedRefs"):
            payload["updatedRefs"] = details["updatedRefs"]
        discussion = details.get("discussion")
        if discussion:
            url = {"web": f"{web}/discussions/{discussion['num']}"}
            payload["discussion"] = {
                **_summary(discussion),
                "id": f"{repo.repo_id}#{discussion['num']}",
                "author": {"id": discussion["author"]["name"]},
                "url": url,
            }
        comment = details.get("comment")
        if comment:
            payload["comment"] = {
                "id": comment["id"],
                "author": {"id": comment["author"]["name"]},
                "hidden": False,
                "content": comment["data"]["latest"]["raw"],
                "url": {"web": f"{web}/discussions/{discussion['num']}#{comment['id']}"},
            }
        return payload

    def _deliver(self, webhook: Webhook, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            webhook.url,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if webhook.secret:
            request.add_header("X-Webhook-Secret", webhook.secret)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status: int | None = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError:
            status = None
        self.deliveries.append(Delivery(webhook.id, payload, status))


def _summary(discussion: dict) -> dict:
    return {key: value for key, value in discussion.items() if key != "events"}
