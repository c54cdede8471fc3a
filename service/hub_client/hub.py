"""Publishing a merged model: the target repo is created only now, and the whole folder
(weights, config, tokenizer, recipe, card) goes up as one commit whose description carries
the job id. A retried push first looks for that commit, so a job is never pushed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from service.hub_client.retry import RetryPolicy, with_retries

JOB_TRAILER = "mergebot-job: {job_id}"
DEFAULT_POLICY = RetryPolicy()


def hub_api(endpoint: str, token: str | None) -> HfApi:
    """A client that sends exactly ``token``, or nothing: never a token found in the environment
    or a login file (in the service that would be the bot's own)."""
    return HfApi(endpoint=endpoint, token=token or False)


def find_job_commit(api: HfApi, repo_id: str, job_id: str) -> str | None:
    """The commit of ``repo_id`` that published ``job_id``, if there is one."""
    try:
        commits = api.list_repo_commits(repo_id)
    except RepositoryNotFoundError:
        return None
    trailer = JOB_TRAILER.format(job_id=job_id)
    return next((c.commit_id for c in commits if trailer in (c.message or "")), None)


def publish(
    api: HfApi,
    folder: Path,
    repo_id: str,
    job_id: str,
    *,
    private: bool,
    title: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_retry: Callable[[str], None] | None = None,
) -> str:
    """Push ``folder`` to ``repo_id`` as one commit for ``job_id``; return that commit's id.
    A repo this call created is deleted again if the commit fails."""

    def push() -> str:
        existing = find_job_commit(api, repo_id, job_id)
        if existing:
            return existing
        existed = api.repo_exists(repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        try:
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=title,
                commit_description=JOB_TRAILER.format(job_id=job_id),
            )
        except Exception:
            if not existed:  # an empty repo would be a half-published result
                api.delete_repo(repo_id, missing_ok=True)
            raise
        return commit.oid

    return with_retries(push, policy, on_retry=on_retry)
