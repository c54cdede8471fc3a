"""The Space's examples in a real browser, as a newcomer tries them: every example (and the
fresh form) proposes a target that nothing has yet, so one example after another is queued
without renaming anything. Not signed in: the bot's namespace, one job at a time."""

from __future__ import annotations

import re

import pytest
from browser_env import browser, choose, demo_space, field, page
from playwright.sync_api import expect
from service_env import BOT_TOKEN

from service.space.recipe_form import FIRST_EXAMPLE
from service.space.search_form import FIRST_SEARCH

pytestmark = pytest.mark.slow

__all__ = ["browser", "demo_space", "page"]  # the fixtures, used by this module's tests


@pytest.fixture(scope="module")
def space(demo_space):
    return demo_space


NEW_JOB_OR_REFUSAL = """([outcome, job, known]) => {
  const said = document.querySelector(outcome).innerText;
  const id = document.querySelector(`${job} input, ${job} textarea`).value;
  return /Not (submitted|started)/.test(said) || (id !== "" && !known.includes(id));
}"""


def run_example(
    page, space, name: str | None, known: set[str], prefix: str = ""
) -> tuple[str, str]:
    """Load example ``name`` (None: the form as it opened), press the start button without
    touching anything, and return the job queued (not one of the ``known``) and the target
    the form proposed."""
    job = f"#{prefix}job-id"
    if name is not None:
        choose(page, f"#{prefix}example", name)
        page.locator(f"#load-{prefix}example").click()
        expect(field(page, job)).to_have_value("")  # the example is in: a fresh start
    target = field(page, f"#{prefix}target")
    expect(target).to_have_value(re.compile(r"^mergebot/[\w.-]+$"))
    page.locator("#search-start" if prefix else "#merge").click()
    page.wait_for_function(NEW_JOB_OR_REFUSAL, arg=[f"#{prefix}outcome", job, sorted(known)])
    said = page.locator(f"#{prefix}outcome").inner_text()
    assert not re.search(r"Not (submitted|started)", said), said + error_text(page)
    job_id = field(page, job).input_value()
    assert space.job(job_id)["target"] == target.input_value()
    return job_id, target.input_value()


def error_text(page) -> str:
    return " ".join(page.locator("#error-target").all_inner_texts())


def cancel(space, job_id: str) -> None:
    """Stop a search as the bot's operator (a request without sign-in belongs to nobody)."""
    assert space.call("POST", f"/api/jobs/{job_id}/cancel", token=BOT_TOKEN)[0] == 200
    assert space.wait_done(job_id)["status"] == "cancelled"


def test_merge_examples_run_one_after_another_without_renaming(page, space):
    jobs, targets = set(), set()
    for name in (None, "SLERP of two models", FIRST_EXAMPLE):  # None: the fresh form (TIES)
        job_id, target = run_example(page, space, name, jobs)
        assert space.wait_done(job_id)["status"] == "succeeded"  # one at a time without sign-in
        jobs.add(job_id)
        targets.add(target)
    assert targets == {"mergebot/ties-merge", "mergebot/slerp-merge", "mergebot/ties-merge-2"}


def test_search_examples_run_one_after_another_without_renaming(page, space):
    page.get_by_role("tab", name="Search", exact=True).click()
    expect(field(page, "#search-example")).to_have_value(FIRST_SEARCH)
    jobs, targets = set(), set()
    for name in (None, "Task arithmetic weights for exact answers", FIRST_SEARCH):
        job_id, target = run_example(page, space, name, jobs, prefix="search-")
        cancel(space, job_id)  # one job at a time without sign-in
        jobs.add(job_id)
        targets.add(target)
    assert targets == {
        "mergebot/ties-search",
        "mergebot/task_arithmetic-search",
        "mergebot/ties-search-2",
    }
