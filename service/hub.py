"""Publishing a merged model: the target repo is created only now, and the whole folder
(weights, config, tokenizer, recipe, card) goes up as one commit whose description carries
the job id. A retried push first looks for that commit, so a job is never pushed twice.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from service.retry import RetryPolicy, with_retries

JOB_TRAILER = "mergebot-job: {job_id}"
DEFAULT_POLICY = RetryPolicy()


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
) -> str:
    """Push ``folder`` to ``repo_id`` as one commit for ``job_id``; return that commit's id."""

    def push() -> str:
        existing = find_job_commit(api, repo_id, job_id)
        if existing:
            return existing
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=title,
            commit_description=JOB_TRAILER.format(job_id=job_id),
        )
        return commit.oid

    return with_retries(push, policy)
