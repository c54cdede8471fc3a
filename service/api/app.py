"""The JSON API for scripts, served by ``mergebot serve`` (the Space mounts its UI beside it).

| call | does |
|---|---|
| `GET /api/health` | the server is up, and which Hub it uses |
| `POST /api/jobs` `{recipe, target, private?, follow_sources?}` | validate and queue; 202 with the job |
| `GET /api/jobs[?requester=NAME&limit=N]` | recent jobs, in short (private ones only to their requester); `limit` 1–200 |
| `GET /api/jobs/{id}` | one job: status, stage, fraction, log, error, result URL, card |
| `POST /api/jobs/{id}/cancel[?publish_best=true]` | the requester (or the bot's operator) stops a job; a search with `publish_best` stops within seconds, abandoning its running trial, and publishes its best candidate so far |
| `POST /api/searches` `{spec, target, private?}` | validate an evolutionary search spec and queue it; 202 with the job |
| `GET /api/searches/{id}` | a search's status: the job, the sources' and uniform merge's fitness, trials done of the budget, each trial's fitness and the best so far, the best genes, `seconds_left` of the wall-time budget (a bound, not an estimate of when the search ends), and when it ends the fitness table |
| `GET /api/searches/{id}/trials` | every completed trial in full: stage, genes, fitness, per-task scores, seconds, worker |
| `POST /api/follows/{ns}/{name}/stop` or `start` | the requester stops or restarts re-merges of a result |
| `POST /api/webhooks/hub` | Hub webhooks (`X-Webhook-Secret` = `MERGEBOT_WEBHOOK_SECRET`): discussions and source updates |

A request is signed with the requester's Hub token (`Authorization: Bearer hf_…`); without one
the merge goes to the bot's namespace, if the bot has one. The Hub is asked whose a token is
once per token and few minutes, not on every request.

Every refusal is `{"error": "<one sentence>", "field": "<the field it is about, or null>"}`
with its status: 400 a bad request, 401 sign-in needed or the token refused, 403 not yours,
404 no such job (or one you may not see), 413 a body over the size limit, 429 your queue is
full, 503 the Hub cannot be reached, 507 the job does not fit the bot's disk now. Anything unexpected is a 500 whose `error` carries an id
that the server's log has with the details.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from merge_engine.errors import MergeError, excerpt
from service.api import reference
from service.errors import NotFound, ServiceError, TooLarge
from service.intake.discussions import DiscussionWatcher
from service.intake.jobs import JobService
from service.intake.recent_jobs import JobView, RecentJobs
from service.intake.request import Identity, MergeRequest, SearchRequest
from service.workflows.job_store import Job

log = logging.getLogger("mergebot.api")
T = TypeVar("T")


def _token(authorization: str | None) -> str | None:
    return (authorization.removeprefix("Bearer ").strip() or None) if authorization else None


class SubmitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str
    """The recipe as YAML, as mergekit users write it."""
    target: str
    private: bool = False
    follow_sources: bool = False


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str
    """The search spec as YAML, as `mergebot evolve` reads it."""
    target: str
    private: bool = False


class _Scope(BaseModel):
    scope: str


class _Repo(BaseModel):
    name: str


class WebhookPayload(BaseModel):
    """The part of a Hub webhook's body the bot reads (the Hub sends more)."""

    event: _Scope
    repo: _Repo


def _refusal(error: str, field: str | None, status: int) -> JSONResponse:
    return JSONResponse({"error": error, "field": field}, status_code=status)


def _validation_sentence(errors: list[Any]) -> tuple[str, str | None]:
    """The first of pydantic's or FastAPI's validation errors as (sentence, field); the input
    itself is never echoed."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    message = first.get("msg", "is not valid")
    return (f"{field}: {message}" if field else message), field


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body with pydantic's parser (no NaN, bounded nesting): a bad body is a
    400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        sentence, field = _validation_sentence(error.errors(include_input=False))
        raise ServiceError(sentence, field) from None


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, from its Content-Length or, for a
    body sent in chunks, as soon as it grows past the limit, before it is read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        too_large = TooLarge(
            f"the request body is over the {limit // 1024} KB limit of this bot; send a smaller recipe"
        )
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _refusal(str(too_large), None, too_large.status)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


def create_app(service: JobService) -> FastAPI:
    app = FastAPI(
        title="mergebot",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    recent = RecentJobs(service.get)

    def identity_of(authorization: str | None) -> Identity:
        """Who signed the request (a cached Hub answer); anonymous when nobody did."""
        return service.identities.of(_token(authorization))

    async def read(call: Callable[..., T], *args: Any) -> T:
        """A database read for a request: on the event loop with SQLite (a local file whose
        readers never wait for writers, in WAL mode; a thread hop would cost more than the
        read), in a thread with a database across the network."""
        if service.settings.uses_sqlite:
            return call(*args)
        return await run_in_threadpool(call, *args)

    async def identity_without_waiting(authorization: str | None) -> Identity:
        """The same, on the event loop when the answer is cached; only a token the bot has not
        seen lately takes a thread to ask the Hub."""
        token = _token(authorization)
        known = service.identities.known(token)
        return known if known is not None else await run_in_threadpool(identity_of, token)

    @app.exception_handler(MergeError)
    def merge_error(_request: Request, error: MergeError) -> JSONResponse:
        return _refusal(str(error), getattr(error, "field", None), getattr(error, "status", 400))

    @app.exception_handler(RequestValidationError)
    def bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _refusal(*_validation_sentence(list(error.errors())), 400)

    @app.exception_handler(Exception)
    def unexpected(_request: Request, error: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("error %s: %s", error_id, type(error).__name__, exc_info=error)
        return _refusal(
            f"something went wrong on the server (error {error_id}); try again, and report the id if it repeats",
            None,
            500,
        )

    @app.get("/api/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """The API's reference, readable offline (no CDN)."""
        return HTMLResponse(reference.render(app.openapi()))

    @app.get("/api/health")
    async def health() -> dict:
        """Answered on the event loop itself: it never waits behind requests that wait for
        the Hub."""
        return {"ok": True, "hub": service.settings.endpoint}

    def submit_job(body: SubmitBody, authorization: str | None) -> dict:
        identity = identity_of(authorization)
        request = MergeRequest(
            recipe=service.read_recipe(body.recipe),
            target=body.target,
            requester=identity.name,
            origin="api",
            private=body.private,
            follow_sources=body.follow_sources,
        )
        job = service.submit(request, identity)
        recent.forget(job.id)
        return job.to_json()

    @app.post(
        "/api/jobs",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SubmitBody.model_json_schema()}},
            }
        },
    )
    async def submit(request: Request, authorization: str | None = Header(default=None)) -> dict:
        """Validate a recipe against the Hub (headers only) and queue it: 202 with the job; the
        same request again gives the same job."""
        body = _parse(SubmitBody, await request.body())
        return await run_in_threadpool(submit_job, body, authorization)

    def submit_search_job(body: SearchBody, authorization: str | None) -> dict:
        identity = identity_of(authorization)
        request = SearchRequest(
            spec=service.read_spec(body.spec),
            target=body.target,
            requester=identity.name,
            origin="api",
            private=body.private,
        )
        job = service.submit_search(request, identity)
        recent.forget(job.id)
        service.searches.forget(job.id)
        return job.to_json()

    @app.post(
        "/api/searches",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SearchBody.model_json_schema()}},
            }
        },
    )
    async def submit_search(
        request: Request, authorization: str | None = Header(default=None)
    ) -> dict:
        """Validate a search spec against the Hub (headers and task data) and queue it: 202
        with the job; the same request again gives the same job."""
        body = _parse(SearchBody, await request.body())
        return await run_in_threadpool(submit_search_job, body, authorization)

    async def visible_search(job_id: str, authorization: str | None) -> JobView:
        """A search's status as the Space's plot also reads it: at most a second old."""
        identity = await identity_without_waiting(authorization)
        hit, view = service.searches.cached(job_id)
        if not hit:
            view = await run_in_threadpool(service.searches.load, job_id)
        if view is None or view.job.kind != "search" or not service.may_see(view.job, identity):
            raise NotFound(f"there is no search {excerpt(job_id)}; check the id")
        return view

    @app.get("/api/searches/{job_id}")
    async def search(job_id: str, authorization: str | None = Header(default=None)) -> Response:
        """A search's status with its trials so far, for plotting elsewhere."""
        view = await visible_search(job_id, authorization)
        return Response(view.body, media_type="application/json")

    def trials_json(job: Job) -> bytes:
        # JSON made here, in a worker thread: returned as a list, FastAPI would encode every
        # trial's genes on the event loop
        return json.dumps([asdict(r) for r in service.trials(job)], allow_nan=False).encode()

    @app.get("/api/searches/{job_id}/trials", response_model=list[dict])
    async def search_trials(
        job_id: str, authorization: str | None = Header(default=None)
    ) -> Response:
        """Every completed trial of a search, in full."""
        view = await visible_search(job_id, authorization)
        body = await run_in_threadpool(trials_json, view.job)
        return Response(body, media_type="application/json")

    @app.get("/api/jobs")
    async def jobs(
        requester: str | None = Query(default=None, max_length=200),
        limit: int = Query(default=50, ge=1, le=200),
        authorization: str | None = Header(default=None),
    ) -> JSONResponse:
        """Recent jobs in short (no recipe, log or card); private ones only to their requester."""
        identity = await identity_without_waiting(authorization)
        found = await read(service.list, requester, limit)
        return JSONResponse([job.summary_json() for job in found if service.may_see(job, identity)])

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, authorization: str | None = Header(default=None)) -> Response:
        """Status reads are the most frequent call: no Hub call once the token is known, one
        database read per job per moment however many poll it, and the JSON made once."""
        identity = await identity_without_waiting(authorization)
        hit, view = recent.cached(job_id)
        if not hit:
            view = await read(recent.load, job_id)
        if view is None or not service.may_see(view.job, identity):
            raise NotFound(f"there is no job {excerpt(job_id)}; check the id")
        return Response(view.body, media_type="application/json")

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(
        job_id: str,
        publish_best: bool = Query(default=False),
        authorization: str | None = Header(default=None),
    ) -> dict:
        """Stop a queued or running job (its requester, or the bot's operator); a running
        search with ``publish_best`` publishes its best candidate so far."""
        try:
            return service.cancel(job_id, identity_of(authorization), publish_best).to_json()
        finally:
            recent.forget(job_id)
            service.searches.forget(job_id)

    @app.post("/api/follows/{namespace}/{name}/{action}")
    def follow(
        namespace: str, name: str, action: str, authorization: str | None = Header(default=None)
    ) -> dict:
        """Stop or restart the re-merges of a result when its sources move (its requester)."""
        if action not in ("stop", "start"):
            raise ServiceError("the action is stop or start", "action")
        identity = identity_of(authorization)
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
            return _refusal("wrong or missing X-Webhook-Secret", "X-Webhook-Secret", 401)
        payload = _parse(WebhookPayload, await request.body())
        scope, repo = payload.event.scope, payload.repo.name
        if scope.startswith("discussion"):
            await run_in_threadpool(DiscussionWatcher(service).poll, repo)
        elif scope == "repo.content":
            await run_in_threadpool(service.follows.check_all, repo)
        return JSONResponse({"ok": True})

    return app
