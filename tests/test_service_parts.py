"""The service's pure parts, in-process: who may push where, the token vault, the clock's
sweep, progress, and the sentences a failed job ends with."""

from __future__ import annotations

import json
import stat
import time

import httpx2 as httpx
import pytest
from cryptography.fernet import Fernet
from huggingface_hub.errors import HfHubHTTPError

from merge_engine.errors import MergeError, RecipeError, SourceError
from merge_engine.sources.hub_failures import answered, read_failed
from service.hub_client.retry import RetryPolicy
from service.intake.clock import sweep
from service.intake.jobs import JobService
from service.intake.recent_jobs import RecentJobs
from service.intake.request import Identity, check_push_rights
from service.settings import Settings
from service.space.job_panel import card_shown, copy_stem, result_link
from service.workflows.job_store import Job
from service.workflows.job_workflow import describe_failure
from service.workflows.token_vault import TokenVault, load_key


@pytest.mark.parametrize(
    ("target", "identity", "allowed"),
    [
        ("alice/m", Identity("alice", "t"), True),
        ("team/m", Identity("alice", "t", ("team",)), True),
        ("bob/m", Identity("alice", "t"), False),
        ("bot/m", Identity("alice", "t"), False),  # a signed-in user never borrows the bot's token
        ("bot/m", Identity(), True),
        ("bot/m", Identity("someone-in-a-discussion"), True),
        ("alice/m", Identity("alice"), False),  # a name without a token proves nothing
    ],
)
def test_push_rights(target, identity, allowed):
    if allowed:
        check_push_rights(target, identity, "bot")
    else:
        with pytest.raises(RecipeError) as error:
            check_push_rights(target, identity, "bot")
        assert error.value.field == "target"


def test_without_a_bot_namespace_anonymous_requests_are_refused():
    with pytest.raises(RecipeError, match="sign in"):
        check_push_rights("bot/m", Identity(), None)


def service(tmp_path, **values) -> JobService:
    return JobService(
        Settings(work_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite", **values)
    )


def test_tokens_are_encrypted_at_rest_and_erased(tmp_path):
    jobs = service(tmp_path)
    jobs.vault.put("job-1", "hf_secret_token")
    jobs.vault.put("job-2", "hf_other_token")
    assert jobs.vault.get("job-1") == "hf_secret_token"
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("db.sqlite*"))
    assert b"hf_secret_token" not in stored and b"hf_other_token" not in stored
    jobs.vault.erase("job-1")
    assert jobs.vault.get("job-1") is None and jobs.vault.get("job-2") == "hf_other_token"
    jobs.vault.erase("job-2")
    assert jobs.vault.get("job-2") is None


def test_a_token_stored_under_another_key_is_a_clear_error(tmp_path):
    jobs = service(tmp_path)
    jobs.vault.put("job-1", "hf_secret_token")
    other = TokenVault(jobs.vault.engine, Fernet.generate_key())
    with pytest.raises(MergeError, match="MERGEBOT_SECRET_KEY"):
        other.get("job-1")


def test_the_key_file_is_made_once_and_readable_only_by_its_owner(tmp_path):
    key = load_key(None, tmp_path, shared_database=False)
    assert load_key(None, tmp_path, shared_database=False) == key
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    with pytest.raises(MergeError, match="MERGEBOT_SECRET_KEY"):
        load_key(None, tmp_path / "pg", shared_database=True)


def job(job_id: str, status: str, stage: str = "queued", fraction: float = 0.0) -> Job:
    return Job(
        job_id,
        1,
        "alice",
        "api",
        "alice/m",
        False,
        False,
        "recipe",
        {},
        status=status,
        stage=stage,
        fraction=fraction,
    )


def test_the_sweep_removes_what_ended_jobs_left_and_nothing_else(tmp_path):
    jobs = service(tmp_path)
    for job_id, status in (
        ("job-done", "succeeded"),
        ("job-failed", "failed"),
        ("job-live", "running"),
    ):
        jobs.store.add_within_limit(job(job_id, status), 10)
        jobs.vault.put(job_id, "hf_token")
        (jobs.settings.job_dir(job_id) / "merged").mkdir(parents=True)
    (jobs.settings.job_dir("job-unknown")).mkdir()
    assert sweep(jobs) == 3
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == ["job-live"]
    assert jobs.vault.get("job-live") == "hf_token" and jobs.vault.get("job-done") is None


def test_progress_counts_every_stage():
    assert job("j", "queued").progress == 0.0
    assert job("j", "running", "merge", 0.5).progress == pytest.approx(2.5 / 6)
    assert job("j", "succeeded", "done", 1.0).progress == 1.0


def http_error(status: int) -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://hub/api/x"))
    return HfHubHTTPError(f"{status}", response=response)


def test_failure_sentences_name_the_target_and_the_status():
    assert "alice/m" in describe_failure(http_error(401), "push", "alice/m")
    assert "401" in describe_failure(http_error(401), "push", "alice/m")
    assert "403" in describe_failure(http_error(403), "push", "alice/m")
    assert describe_failure(RecipeError("bad density"), "pre-flight", "alice/m") == "bad density"
    assert "KeyError" in describe_failure(KeyError("x"), "merge", "alice/m")


def test_failures_that_a_retry_cannot_fix_say_what_is_wrong_not_to_try_again():
    for status in (400, 401, 403, 404):
        assert "try again" not in answered(status, "alice/m@v9"), status
    assert "alice/m@v9 (404)" in answered(404, "alice/m@v9")
    assert "try again later" in answered(503, "alice/m")
    assert "again later" not in describe_failure(http_error(404), "download", "alice/m")
    damaged = read_failed(ValueError("header too large"), "alice/m@abc")
    assert "ValueError" in damaged and "try again" not in damaged
    assert "try again" in read_failed(httpx.ConnectError("refused"), "alice/m")
    assert "disk" in read_failed(OSError(28, "No space left on device"), "alice/m")
    assert "try again" not in describe_failure(KeyError("x"), "merge", "alice/m")


def test_a_download_error_is_retried_when_the_hub_error_under_it_is_transient():
    policy = RetryPolicy(first_delay=1.0)
    for status, retried in ((503, True), (404, False)):
        try:
            try:
                raise http_error(status)
            except HfHubHTTPError:
                raise SourceError("downloading org/m failed") from None
        except SourceError as error:
            assert (policy.delay(error, 1) is not None) == retried


def test_the_sweep_keeps_the_token_of_a_merge_that_follows_its_sources(tmp_path):
    jobs = service(tmp_path)
    done = job("job-followed", "succeeded")
    done.follow_sources, done.sources = True, {"alice/a": "0" * 40}
    jobs.store.add_within_limit(done, 10)
    jobs.follows.record(done, "hf_follow_token")
    sweep(jobs)
    assert jobs.vault.get("follow:alice/m") == "hf_follow_token"
    jobs.follows.stop("alice/m", "stopped by alice")
    assert jobs.vault.get("follow:alice/m") is None
    assert jobs.follows.get("alice/m").reason == "stopped by alice"


def test_a_job_whose_merged_files_are_gone_fails_with_a_sentence(tmp_path):
    from service.workflows import steps

    jobs = service(tmp_path)
    steps.configure(jobs)
    missing = job("job-elsewhere", "running", "verify")
    with pytest.raises(MergeError, match="gone from this worker's disk"):
        steps.merged_output(missing)
    (jobs.settings.job_dir("job-elsewhere") / "merged").mkdir(parents=True)
    assert steps.merged_output(missing).is_dir()


def test_status_polls_of_one_job_read_the_database_once_per_moment():
    reads: list[str] = []
    state = {"status": "running"}

    def read(job_id: str) -> Job:
        reads.append(job_id)
        return job(job_id, state["status"])

    recent = RecentJobs(read, seconds=3600.0)
    assert recent.cached("job-1") == (False, None)
    assert recent.load("job-1").job.status == "running"
    for _ in range(100):
        hit, view = recent.cached("job-1")
        assert hit and json.loads(view.body)["status"] == "running"
    assert reads == ["job-1"]
    state["status"] = "cancelled"  # changed by this process: forgotten, read fresh
    recent.forget("job-1")
    assert recent.cached("job-1") == (False, None)
    assert recent.load("job-1").job.status == "cancelled"
    assert RecentJobs(read, seconds=0.0).cached("job-1") == (False, None)


def test_a_setting_that_is_not_a_number_is_one_sentence():
    with pytest.raises(MergeError, match=r"^MERGEBOT_MAX_QUEUED='three' is not a number; set it"):
        Settings.from_env({"MERGEBOT_MAX_QUEUED": "three"})
    assert Settings.from_env({"MERGEBOT_MAX_RECIPE_KB": "16"}).recipe_limits.max_bytes == 16384
    bounded = Settings.from_env(
        {
            "MERGEBOT_MAX_PATTERNS": "3",
            "MERGEBOT_MAX_PATTERN_CHARS": "40",
            "MERGEBOT_MAX_COMMENT_KB": "8",
        }
    )
    assert (bounded.recipe_limits.max_patterns, bounded.recipe_limits.max_pattern_chars) == (3, 40)
    assert bounded.max_comment_bytes == 8192


def test_a_card_full_of_image_openers_is_shown_in_linear_time():
    """A card holds the recipe's text (inline calibration examples among it): the image-link
    rewrite scanned from every ``![`` or ``](`` to the card's end: quadratic, tens of seconds
    for this card."""
    card = "![fitness](fitness.png) and ![x](https://a/b.png)\n" + "![" * 15_000 + "![](a" * 15_000
    job = Job("job-1", 1, "alice", "api", "alice/x", False, False, "", {}, card=card)
    job.url, job.commit = "http://hub/alice/x", "abc"
    started = time.monotonic()
    shown = card_shown(job)
    assert time.monotonic() - started < 5  # generous: linear takes milliseconds
    assert shown.startswith(
        "![fitness](http://hub/alice/x/resolve/abc/fitness.png) and ![x](https://a/b.png)"
    )


def test_a_result_link_says_when_it_is_on_the_local_demo_hub_only():
    """The browser test sees the demo's sandbox hub; a deployment's Hub link stays as it was."""
    job = Job("job-1", 1, "alice", "api", "alice/x", False, False, "", {})
    assert result_link(job, "https://huggingface.co") == ""  # not published yet
    job.url = "https://huggingface.co/alice/x"
    assert result_link(job, "https://huggingface.co") == "[alice/x](https://huggingface.co/alice/x)"
    job.url = "http://127.0.0.1:7861/alice/x"
    assert result_link(job, "http://127.0.0.1:7861") == (
        "[alice/x](http://127.0.0.1:7861/alice/x), on the local demo hub at "
        "`http://127.0.0.1:7861`: only a browser on the machine that runs this Space can open it"
    )


@pytest.mark.parametrize(
    ("target", "stem"),
    [
        ("alice/sd-blocks", "sd-blocks"),
        ("alice/sd-blocks-2", "sd-blocks"),
        ("a/qwen2-7b", "qwen2-7b"),
    ],
)
def test_a_copy_of_a_job_proposes_a_target_named_after_the_job_s(target, stem):
    assert copy_stem(target) == stem
