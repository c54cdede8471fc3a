"""The one submit path of every origin (form, discussion, schedule, API), for merges and
evolutionary searches alike, and what can be asked of a job afterwards: its state, the recent
ones, a search's trials, cancel.

Submit runs the engine's pre-flight against the Hub (headers only) with the requester's token
or none, and answers at once with a clear error or a job. The job id is a hash of the pinned
recipe and the target, so a double click or a repeated schedule finds the existing job; a job
that failed or was cancelled runs again as a new attempt under the same id.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from functools import cached_property
from pathlib import Path

from merge_engine import preflight
from merge_engine.errors import MergeError, RecipeError, excerpt
from merge_engine.evolve.checks import CheckedSpec, check_spec
from merge_engine.evolve.report import TrialRecord
from merge_engine.evolve.spec import SearchSpec, spec_from_text
from merge_engine.plan.kinds import Plan
from merge_engine.recipe.schema import ModelReference, Recipe, recipe_from_text, with_revisions
from merge_engine.sources.formats.layouts import Layout
from merge_engine.sources.inspection import inspect_hub, pinned_parts
from service.disk import check_room, merge_bytes, search_bytes
from service.errors import (
    HubUnavailable,
    NotAllowed,
    NotFound,
    QueueLimitError,
    SignInRequired,
)
from service.hub_client.hub import hub_api
from service.hub_client.retry import is_transient
from service.intake.follows import Follows
from service.intake.identities import Identities
from service.intake.recent_jobs import RecentJobs
from service.intake.request import (
    Identity,
    MergeRequest,
    SearchRequest,
    check_daily_search_limits,
    check_hub_only,
    check_limits,
    check_model_count,
    check_push_rights,
    check_search_limits,
    check_target,
    job_id,
    search_job_id,
    with_wall_time,
)
from service.settings import SearchUse, Settings
from service.workflows.job_store import Job, JobStore, make_engine
from service.workflows.once import create_tables as create_event_tables
from service.workflows.token_vault import TokenVault, load_key


class JobService:
    def __init__(self, settings: Settings):
        self.identities = Identities(
            settings.endpoint, settings.identity_ttl_seconds, settings.hub_timeout_seconds
        )
        if settings.bot_token and not settings.bot_namespace:
            settings = replace(settings, bot_namespace=self.identities.of(settings.bot_token).name)
        self.settings = settings
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        self.store = JobStore(engine)
        self.vault = TokenVault(
            engine, load_key(settings.secret_key, settings.work_dir, not settings.uses_sqlite)
        )
        create_event_tables(engine)
        self.follows = Follows(self)
        self.helping: threading.Event | None = None
        """Set to stop this process's helping with other workers' searches."""
        self.searches = RecentJobs(self.get, SEARCH_STATUS_SECONDS, render=self._search_status)
        """Searches' status with their trials, read at most once a second per search however
        many watch it (the API and the Space's plot)."""
        self._layouts: dict[tuple[str | None, str], tuple[float, Layout]] = {}
        self._layouts_lock = threading.Lock()

    def _search_status(self, job: Job) -> dict:
        from service.workflows.search_steps import search_status

        return search_status(self, job) if job.kind == "search" else {}

    @cached_property
    def studies(self):
        """Optuna's storage of the search studies, in the bot's own database."""
        from merge_engine.evolve.study import open_storage

        return open_storage(self.settings.database_url)

    def read_recipe(self, text: str) -> Recipe:
        """A recipe from a request's YAML, within this bot's size, depth and expansion limits."""
        return recipe_from_text(text, self.settings.recipe_limits)

    def read_spec(self, text: str) -> SearchSpec:
        """A search spec from a request's YAML, within the same limits as a recipe."""
        return spec_from_text(text, self.settings.recipe_limits)

    def check(self, request: MergeRequest, identity: Identity) -> tuple[Plan, str]:
        """Everything submit checks, queueing nothing: the plan and the job id it would get.
        What the request alone shows is checked before anything is asked of the Hub."""
        limits = self.settings.limits
        self._check_request(request.recipe, request.target, request.private, identity)
        with self._hub_scratch() as cache:
            plan = preflight(
                request.recipe, token=identity.token or False, hub_only=True, cache_dir=cache
            )
        check_limits(plan.sources, limits)
        self.check_disk(merge_bytes(plan), "the bot's")
        new_id = job_id(plan, request)
        if not identity.token:
            self._check_bot_target(request.target, identity, new_id)
        return plan, new_id

    def model_layout(self, reference: str, identity: Identity) -> Layout | None:
        """What kind of model ``reference`` (``org/name[@revision]`` on the Hub) is — SD1.5,
        SDXL, transformers … — from its file names and headers (seconds), read as the
        requester: their token or none, never the bot's. The Space's form shows the fields
        that apply by it. Remembered per requester and reference for ``LAYOUT_SECONDS``, so
        that typing does not inspect again; None when it cannot be read now (Validate then
        says why)."""
        key = (identity.name if identity.token else None, reference.strip())
        now = time.monotonic()
        with self._layouts_lock:
            known = self._layouts.get(key)
        if known is not None and now - known[0] < LAYOUT_SECONDS:
            return known[1]
        try:
            ref = ModelReference.parse(reference)
            with self._hub_scratch() as cache:
                layout = inspect_hub(ref, identity.token or False, cache).layout
        except Exception:  # noqa: BLE001  (unknown for now: the pre-flight names the problem)
            return None
        with self._layouts_lock:
            self._layouts[key] = (now, layout)
            while len(self._layouts) > LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
        return layout

    def check_search(self, request: SearchRequest, identity: Identity) -> tuple[CheckedSpec, str]:
        """Everything a search's submit checks, queueing nothing: the spec checked against the
        Hub (headers and task data only; the pinned spec is ``checked.spec``) and its job id."""
        spec = with_wall_time(request.spec, self.settings.search_limits)
        self._check_request(spec, request.target, request.private, identity)
        check_search_limits(spec, self.settings.search_limits)
        with self._hub_scratch() as cache:
            checked = check_spec(
                spec,
                token=identity.token or False,
                hub_only=True,
                cache_dir=cache,
                max_genes=self.settings.search_limits.max_genes,
            )
        checked = replace(checked, spec=with_revisions(spec, pinned_parts(checked.sources)))
        check_limits(checked.sources, self.settings.limits)
        self.check_disk(search_bytes(checked.sources), "the bot's")
        new_id = search_job_id(checked.spec, request)
        if self.store.get(new_id) is None:  # asking twice is the same search, not a second
            # what Validate shows; submit checks again in the transaction that queues the job
            earlier = self.store.searches_of_day(identity.requester, new_id)
            check_daily_search_limits(
                checked.spec, earlier, identity.requester, self.settings.search_limits
            )
        if not identity.token:
            self._check_bot_target(request.target, identity, new_id)
        return checked, new_id

    def check_disk(self, needed: int, whose: str) -> None:
        """Refuse a job of ``needed`` bytes that does not fit the work dir's disk now."""
        settings = self.settings
        check_room(settings.work_dir, needed, settings.disk_margin_bytes, whose)

    def _check_request(
        self, document: Recipe | SearchSpec, target: str, private: bool, identity: Identity
    ) -> None:
        """What the request alone shows, before anything is asked of the Hub."""
        check_target(target)
        check_hub_only(document)
        check_model_count(document, self.settings.limits)
        check_push_rights(target, identity, self.settings.bot_namespace)
        if private and identity.name is None:
            what = "search" if isinstance(document, SearchSpec) else "merge"
            raise RecipeError(
                f"a private {what} needs sign-in (nobody else could read it); sign in, or make it public",
                field="private",
            )

    @contextmanager
    def _hub_scratch(self) -> Iterator[Path]:
        """A folder for the engine's pre-flight, read with the requester's token, that is gone
        afterwards: a private repo's files never enter a shared cache. A Hub that cannot be
        reached is a 503, not the requester's mistake."""
        scratch = self.settings.work_dir / "preflight"
        scratch.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as cache:
            try:
                yield Path(cache)
            except MergeError as error:
                if is_transient(error):
                    raise HubUnavailable(
                        f"{error} (the Hub at {self.settings.endpoint} is not answering; your request was not queued)"
                    ) from None
                raise

    def _check_bot_target(self, target: str, identity: Identity, new_id: str) -> None:
        """In the bot's namespace a request may create a repo, or update one that earlier jobs
        of the same named requester made — never another request's result. Requests without
        sign-in are nobody in particular: they only create (or repeat the very same job)."""
        if self.store.get(new_id) is not None:
            return
        requesters = self.store.requesters_of(target)
        if identity.name is not None and requesters == {identity.name}:
            return
        if requesters or self._bot_repo_exists(target):
            raise RecipeError(
                f"{target} already exists and was not made by this request; choose another name",
                field="target",
            )

    def _bot_repo_exists(self, target: str) -> bool:
        try:
            return hub_api(self.settings.endpoint, self.settings.bot_token).repo_exists(target)
        except Exception as error:  # noqa: BLE001  (transport errors differ between versions)
            raise HubUnavailable(
                f"could not reach the Hub at {self.settings.endpoint} to check {target} ({type(error).__name__}); try again in a minute"
            ) from None

    def free_target(self, namespace: str, stem: str) -> str:
        """``namespace/stem``, else ``stem-2``, ``stem-3``, …: the first name that no job
        pushes to and no repo has, for a form to propose (so a person can run one example
        after another without renaming); while the Hub does not answer, the first that no job
        pushes to (submitting checks again)."""
        for number in range(1, PROPOSALS + 1):
            target = f"{namespace}/{stem}" + (f"-{number}" if number > 1 else "")
            if self.store.requesters_of(target):
                continue
            with suppress(HubUnavailable):
                if self._bot_repo_exists(target):
                    continue
            return target
        return f"{namespace}/{stem}-{secrets.token_hex(4)}"

    def submit(self, request: MergeRequest, identity: Identity) -> Job:
        """Validate ``request`` and queue it, or return the job that already does the same."""
        plan, new_id = self.check(request, identity)
        job = Job(
            id=new_id,
            attempt=1,
            requester=identity.requester,
            origin=request.origin,
            target=request.target,
            private=request.private,
            follow_sources=request.follow_sources,
            recipe=_job_recipe(plan, new_id),
            sources={ref.path: sha for ref, sha in plan.revisions().items()},
            log=[
                f"queued: {plan.recipe.merge_method} of {plan.describe_models()} into {request.target}"
            ],
            request_recipe=request.recipe.to_yaml(),
            discussion=request.discussion,
            changes=list(request.changes),
        )
        return self._queue(job, identity)

    def submit_search(self, request: SearchRequest, identity: Identity) -> Job:
        """Validate a search and queue it, or return the job that already does the same."""
        checked, new_id = self.check_search(request, identity)
        spec = checked.spec
        models = ", ".join(str(ref) for ref in spec.sources())
        job = Job(
            id=new_id,
            attempt=1,
            kind="search",
            requester=identity.requester,
            origin=request.origin,
            target=request.target,
            private=request.private,
            follow_sources=False,
            recipe=spec.to_yaml(),
            sources={ref.path: sha for ref, sha in pinned_parts(checked.sources).items()},
            log=[f"queued: a {spec.space} search over {models} into {request.target}"],
            request_recipe=request.spec.to_yaml(),
            discussion=request.discussion,
            trials_booked=spec.total_trials(),
            seconds_booked=spec.budget.wall_time,
        )
        limits = self.settings.search_limits

        def check_day(earlier: SearchUse) -> None:
            check_daily_search_limits(spec, earlier, identity.requester, limits)

        return self._queue(job, identity, check_day)

    def _queue(
        self, job: Job, identity: Identity, check_day: Callable[[SearchUse], None] | None = None
    ) -> Job:
        """Store ``job`` within its requester's queue limit (and, for a search, the daily
        limits: ``check_day`` refuses in the same transaction) and start its workflow."""
        limit = (
            self.settings.max_queued_per_requester
            if identity.token
            else self.settings.max_queued_anonymous
        )
        stored = self.store.add_within_limit(job, limit, check_day)
        if stored is None:
            raise QueueLimitError(
                f"{identity.requester} already has {limit} jobs waiting or running; wait for one to finish or cancel one"
                if identity.token
                else f"requests without sign-in already have {limit} jobs waiting or running; sign in, or wait for one to finish"
            )
        if stored is not job:
            return stored  # the same job, already queued, running or done
        if identity.token:
            self.vault.put(job.id, identity.token)
        from service.workflows.job_workflow import enqueue

        try:
            enqueue(job)
        except Exception:
            self.store.update(
                job.id, status="failed", error="the job could not be queued; submit it again"
            )
            self.vault.erase(job.id)
            raise
        return job

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def trials(self, job: Job) -> list[TrialRecord]:
        """The completed trials of a search job so far, every stage, in order."""
        from service.workflows.search_steps import trial_records

        return trial_records(self, job)

    def list(self, requester: str | None = None, limit: int = 50) -> list[Job]:
        return self.store.list(requester, limit)

    def is_operator(self, identity: Identity) -> bool:
        return bool(identity.token) and identity.token == self.settings.bot_token

    def may_act_for(self, identity: Identity, requester: str) -> bool:
        """Whether ``identity`` speaks for ``requester``: signed in as them (a name without a
        token proves nothing), or the bot's operator."""
        owner = identity.token is not None and identity.name == requester
        return owner or self.is_operator(identity)

    def may_see(self, job: Job, identity: Identity) -> bool:
        """A private job is its requester's (signed in) and the operator's only."""
        return not job.private or self.may_act_for(identity, job.requester)

    def authorise(
        self, identity: Identity, requester: str, private: bool, missing: str, action: str
    ) -> None:
        """Let ``identity`` ``action`` something of ``requester``'s, or refuse: a private thing
        of someone else's answers exactly as if it did not exist (``missing``)."""
        if self.may_act_for(identity, requester):
            return
        if private:
            raise NotFound(missing)
        if identity.token is None:
            raise SignInRequired(f"sign in as {requester} to {action}")
        raise NotAllowed(f"only {requester} can {action}; sign in as them")

    def cancel(self, job_id: str, identity: Identity, publish_best: bool = False) -> Job:
        """Ask a queued or running job to stop; the worker stops at its next checkpoint (a
        tensor, in the merge; a tensor or batch of the running trial, in a search). With
        ``publish_best`` a search that has started (running, or waiting for its next turn)
        instead publishes its best candidate so far. Only the requester — or the bot's own
        token — may cancel."""
        missing = f"there is no job {excerpt(job_id)}; check the id with `mergebot jobs`"
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(missing)
        self.authorise(identity, job.requester, job.private, missing, f"cancel {job_id}")
        wants_best = publish_best and job.kind == "search"
        waits_its_turn = job.stage == "search"  # its next turn publishes at once
        if wants_best and (
            self.store.update_if(job_id, "running", finish_early=True)
            or (waits_its_turn and self.store.update_if(job_id, "queued", finish_early=True))
        ):
            self.store.update(job_id, log="stop requested: publishing the best so far")
            return self.store.get(job_id) or job
        return self.request_cancel(job)

    def set_following(self, target: str, identity: Identity, on: bool) -> str:
        """Stop or restart the following of ``target`` (its requester, or the bot's operator)."""
        missing = (
            f"{excerpt(target)} does not follow its sources; merge it with 'follow source updates'"
        )
        follow = self.follows.get(target)
        if follow is None:
            raise NotFound(missing)
        action = f"change the following of {target}"
        self.authorise(identity, follow.requester, follow.private, missing, action)
        if on:  # the re-merges push with the requester's own token, when they gave it
            own = identity.token if identity.name == follow.requester else None
            self.follows.restart(target, own)
            return f"{target} follows its sources again"
        self.follows.stop(target, f"stopped by {identity.name}")
        return f"{target} no longer follows its sources"

    def request_cancel(self, job: Job) -> Job:
        """Stop ``job`` (whoever asks was checked by the caller)."""
        job_id = job.id
        # compare-and-set: a worker may start the job between our read and this write
        if self.store.update_if(
            job_id, "queued", cancel_requested=True, status="cancelled", stage="cancelled"
        ):
            self.store.update(job_id, log="cancelled")
            self.vault.erase(job_id)  # nothing started: it needs no token
        elif self.store.update_if(job_id, "running", cancel_requested=True):
            self.store.update(job_id, log="cancel requested")
        return self.store.get(job_id) or job

    def finish(self, job_id: str, keep_token: bool = False) -> None:
        """What ends with every job, however it ends: its work directory and its token (kept
        only for a job that runs again when the Hub is back)."""
        if not keep_token:
            self.vault.erase(job_id)
        shutil.rmtree(self.settings.job_dir(job_id), ignore_errors=True)

    def retry_after_outage(self) -> list[Job]:
        """Run again, once, every job that failed because the Hub was unreachable, if the Hub
        answers now; return the jobs queued. Safe in several processes: each job is claimed
        by a compare-and-set."""
        waiting = self.store.failed_by_outage()
        if not waiting or not self._hub_answers():
            return []
        from service.workflows.job_workflow import enqueue

        queued = []
        for job in waiting:
            again = self.store.requeue_after_outage(job.id)
            if again is not None:
                enqueue(again)
                queued.append(again)
        return queued

    def _hub_answers(self) -> bool:
        """Whether the Hub answers HTTP at all (any status below 500) within the timeout."""
        from huggingface_hub.utils import get_session

        try:
            response = get_session().get(
                f"{self.settings.endpoint}/api/whoami-v2", timeout=self.settings.hub_timeout_seconds
            )
        except Exception:  # noqa: BLE001  (down: connection refused, timeout, ...)
            return False
        return response.status_code < 500


LAYOUT_SECONDS = 600.0
"""How long the form trusts a model's layout once read (a repo rarely changes kind)."""
LAYOUTS_KEPT = 1024
SEARCH_STATUS_SECONDS = 1.0
"""How old a search's status may be: reading its trials costs ~1 ms a trial."""
PROPOSALS = 20
"""Numbered names a form's proposed target tries before it takes a random suffix."""


def _job_recipe(plan: Plan, job_id: str) -> str:
    """The pinned recipe the worker merges. A random method gets a seed derived from the job
    id, so a job resumed after a crash draws the same tensors as its first run."""
    recipe = plan.pinned_recipe()
    if plan.random and recipe.random_seed is None:
        seed = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
        recipe = recipe.model_copy(update={"random_seed": seed})
    return recipe.to_yaml()
