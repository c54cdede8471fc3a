"""The one submit path of every origin (form, discussion, schedule, API), and what can be asked
of a job afterwards: its state, the recent ones, cancel.

Submit runs the engine's pre-flight against the Hub (headers only) with the requester's token
or none, and answers at once with a clear error or a job. The job id is a hash of the pinned
recipe and the target, so a double click or a repeated schedule finds the existing job; a job
that failed or was cancelled runs again as a new attempt under the same id.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

from merge_engine import preflight
from merge_engine.errors import MergeError, RecipeError
from merge_engine.plan import MergePlan
from service.follows import Follows
from service.hub import hub_api, identify
from service.intake import (
    Identity,
    MergeRequest,
    check_hub_only,
    check_limits,
    check_push_rights,
    check_target,
    job_id,
)
from service.job_store import ACTIVE, Job, JobStore, make_engine
from service.once import create_tables as create_event_tables
from service.settings import Settings
from service.token_vault import TokenVault, load_key


class QueueLimitError(MergeError):
    """The requester already has as many jobs waiting as the bot allows."""


class JobService:
    def __init__(self, settings: Settings):
        if settings.bot_token and not settings.bot_namespace:
            settings = replace(
                settings, bot_namespace=identify(settings.endpoint, settings.bot_token).name
            )
        self.settings = settings
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        self.store = JobStore(engine)
        self.vault = TokenVault(
            engine, load_key(settings.secret_key, settings.work_dir, not settings.uses_sqlite)
        )
        create_event_tables(engine)
        self.follows = Follows(self)

    def check(self, request: MergeRequest, identity: Identity) -> tuple[MergePlan, str]:
        """Everything submit checks, queueing nothing: the plan and the job id it would get."""
        check_target(request.target)
        check_hub_only(request.recipe)
        check_push_rights(request.target, identity, self.settings.bot_namespace)
        if not identity.token:
            self._check_bot_target(request.target, identity.requester)
        plan = preflight(request.recipe, token=identity.token or False, hub_only=True)
        check_limits(plan, self.settings.limits)
        return plan, job_id(plan, request.target)

    def _check_bot_target(self, target: str, requester: str) -> None:
        """In the bot's namespace a request may create a repo, or update one its requester's
        earlier job made — never another repo of the bot's."""
        if self.store.has_target(target, requester):
            return
        if hub_api(self.settings.endpoint, self.settings.bot_token).repo_exists(target):
            raise RecipeError(
                f"{target} already exists and was not made for {requester}; choose another name",
                field="target",
            )

    def submit(self, request: MergeRequest, identity: Identity) -> Job:
        """Validate ``request`` and queue it, or return the job that already does the same."""
        plan, new_id = self.check(request, identity)
        existing = self.store.get(new_id)
        if existing and (existing.status in ACTIVE or existing.status == "succeeded"):
            return existing
        limit = (
            self.settings.max_queued_per_requester
            if identity.token
            else self.settings.max_queued_anonymous
        )
        if self.store.count_active(identity.requester) >= limit:
            raise QueueLimitError(
                f"{identity.requester} already has {limit} jobs waiting or running; wait for one to finish or cancel one"
                if identity.token
                else f"requests without sign-in already have {limit} jobs waiting or running; sign in, or wait for one to finish"
            )
        job = Job(
            id=new_id,
            attempt=existing.attempt + 1 if existing else 1,
            requester=identity.requester,
            origin=request.origin,
            target=request.target,
            private=request.private,
            follow_sources=request.follow_sources,
            recipe=_job_recipe(plan, new_id),
            sources={ref.path: s.revision for ref, s in plan.sources.items() if s.revision},
            log=[f"queued: {plan.method.name} of {len(plan.sources)} models into {request.target}"],
            request_recipe=request.recipe.to_yaml(),
            discussion=request.discussion,
            changes=list(request.changes),
        )
        self.store.add(job)
        if identity.token:
            self.vault.put(job.id, identity.token)
        from service.pipeline import enqueue

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

    def list(self, requester: str | None = None, limit: int = 50) -> list[Job]:
        return self.store.list(requester, limit)

    def is_operator(self, identity: Identity) -> bool:
        return bool(identity.token) and identity.token == self.settings.bot_token

    def may_act_for(self, identity: Identity, requester: str) -> bool:
        """Whether ``identity`` speaks for ``requester``: signed in as them (a name without a
        token proves nothing), or the bot's operator."""
        owner = identity.token is not None and identity.name == requester
        return owner or self.is_operator(identity)

    def cancel(self, job_id: str, identity: Identity) -> Job:
        """Ask a queued or running job to stop; the worker stops at its next checkpoint (a
        tensor, in the merge). Only the requester — or the bot's own token — may cancel."""
        job = self.store.get(job_id)
        if job is None:
            raise MergeError(f"there is no job {job_id}; check the id with `mergebot jobs`")
        if not self.may_act_for(identity, job.requester):
            raise MergeError(f"only {job.requester} can cancel {job_id}; sign in as them")
        return self.request_cancel(job)

    def set_following(self, target: str, identity: Identity, on: bool) -> str:
        """Stop or restart the following of ``target`` (its requester, or the bot's operator)."""
        follow = self.follows.get(target)
        if follow is None:
            raise MergeError(
                f"{target} does not follow its sources; merge it with 'follow source updates'"
            )
        if not self.may_act_for(identity, follow.requester):
            raise MergeError(
                f"only {follow.requester} can change the following of {target}; sign in as them"
            )
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

    def finish(self, job_id: str) -> None:
        """What ends with every job, however it ends: its token and its work directory."""
        self.vault.erase(job_id)
        shutil.rmtree(self.settings.job_dir(job_id), ignore_errors=True)


def _job_recipe(plan: MergePlan, job_id: str) -> str:
    """The pinned recipe the worker merges. A random method gets a seed derived from the job
    id, so a job resumed after a crash draws the same tensors as its first run."""
    recipe = plan.pinned_recipe()
    if plan.method.random and recipe.random_seed is None:
        seed = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
        recipe = recipe.model_copy(update={"random_seed": seed})
    return recipe.to_yaml()
