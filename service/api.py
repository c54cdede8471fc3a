"""The JSON API for scripts, served by ``mergebot serve`` (the Space mounts its UI beside it).

| call | does |
|---|---|
| `GET /api/health` | the server is up, and which Hub it uses |
| `POST /api/jobs` `{recipe, target, private?, follow_sources?}` | validate and queue; 202 with the job, 400 `{error, field}`, 429 when the requester's queue is full |
| `GET /api/jobs[?requester=NAME]` | recent jobs (private ones only to their requester) |
| `GET /api/jobs/{id}` | one job: status, stage, fraction, log, error, result URL |
| `POST /api/jobs/{id}/cancel` | the requester (or the bot's operator) stops a job |
| `POST /api/follows/{ns}/{name}/stop` or `start` | the requester stops or restarts re-merges of a result |
| `POST /api/webhooks/hub` | Hub webhooks (`X-Webhook-Secret` = `MERGEBOT_WEBHOOK_SECRET`): discussions and source updates |

A request is signed with the requester's Hub token (`Authorization: Bearer hf_…`); without one
the merge goes to the bot's namespace, if the bot has one.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from merge_engine.errors import MergeError, RecipeError
from merge_engine.recipe import recipe_from_text
from service.discussions import DiscussionWatcher
from service.hub import identify
from service.intake import Identity, MergeRequest
from service.jobs import JobService, QueueLimitError


class SubmitBody(BaseModel):
    recipe: str
    """The recipe as YAML, as mergekit users write it."""
    target: str
    private: bool = False
    follow_sources: bool = False


def _identity(service: JobService, authorization: str | None) -> Identity:
    token = authorization.removeprefix("Bearer ").strip() if authorization else None
    return identify(service.settings.endpoint, token or None)


def create_app(service: JobService) -> FastAPI:
    app = FastAPI(title="mergebot", docs_url="/api/docs", openapi_url="/api/openapi.json")

    @app.exception_handler(MergeError)
    def merge_error(_request: Request, error: MergeError) -> JSONResponse:
        status = 429 if isinstance(error, QueueLimitError) else 400
        field = error.field if isinstance(error, RecipeError) else None
        return JSONResponse({"error": str(error), "field": field}, status_code=status)

    @app.get("/api/health")
    def health() -> dict:
        return {"ok": True, "hub": service.settings.endpoint}

    @app.post("/api/jobs", status_code=202)
    def submit(body: SubmitBody, authorization: str | None = Header(default=None)) -> dict:
        identity = _identity(service, authorization)
        request = MergeRequest(
            recipe=recipe_from_text(body.recipe),
            target=body.target,
            requester=identity.name,
            origin="api",
            private=body.private,
            follow_sources=body.follow_sources,
        )
        return service.submit(request, identity).to_json()

    def visible(job, identity: Identity) -> bool:
        """A private job is its requester's (signed in) and the operator's only."""
        return not job.private or service.may_act_for(identity, job.requester)

    @app.get("/api/jobs")
    def jobs(
        requester: str | None = None,
        limit: int = 50,
        authorization: str | None = Header(default=None),
    ) -> list[dict]:
        identity = _identity(service, authorization)
        found = service.list(requester, min(limit, 200))
        return [job.to_json() for job in found if visible(job, identity)]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str, authorization: str | None = Header(default=None)) -> JSONResponse:
        found = service.get(job_id)
        if found is None or not visible(found, _identity(service, authorization)):
            return JSONResponse({"error": f"there is no job {job_id}"}, status_code=404)
        return JSONResponse(found.to_json())

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str, authorization: str | None = Header(default=None)) -> dict:
        return service.cancel(job_id, _identity(service, authorization)).to_json()

    @app.post("/api/follows/{namespace}/{name}/{action}")
    def follow(
        namespace: str, name: str, action: str, authorization: str | None = Header(default=None)
    ) -> dict:
        if action not in ("stop", "start"):
            raise RecipeError("the action is stop or start", field="action")
        identity = _identity(service, authorization)
        return {
            "message": service.set_following(f"{namespace}/{name}", identity, action == "start")
        }

    @app.post("/api/webhooks/hub")
    async def hub_webhook(
        request: Request, x_webhook_secret: str | None = Header(default=None)
    ) -> JSONResponse:
        """Hub webhooks: a discussion event polls that repo's discussions now, a repo update
        checks the follows that read it. Both are idempotent, so a poll seeing the same event
        later does nothing more."""
        secret = service.settings.webhook_secret
        if not secret or not hmac.compare_digest(x_webhook_secret or "", secret):
            return JSONResponse({"error": "wrong or missing X-Webhook-Secret"}, status_code=401)
        payload = await request.json()
        scope, repo = payload["event"]["scope"], payload["repo"]["name"]
        if scope.startswith("discussion"):
            await run_in_threadpool(DiscussionWatcher(service).poll, repo)
        elif scope == "repo.content":
            await run_in_threadpool(service.follows.check_all, repo)
        return JSONResponse({"ok": True})

    return app
