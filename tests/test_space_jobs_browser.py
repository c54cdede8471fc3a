"""The Space's Jobs tab and job pages in a real browser (Debian's Chromium driven by
Playwright), against ``mergebot serve`` with the sandbox hub: "Your jobs" says how to get some;
a merge job opened from the table fills the form with a copy of its recipe (an SD block-weighted
merge and a language-model merge alike) and brings its panel into view; a finished job's panel,
a merge's or a search's, is no longer polled; and since the sandbox hub runs on this machine,
a result's link says it is on the local demo hub. A screenshot of a job opened as a copy goes
to ``test-artifacts/screenshots``."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from browser_env import (
    browser,
    demo_space,
    expect_text,
    field,
    set_value,
    shot,
    space_page,
)
from playwright.sync_api import expect

from merge_engine.sources.formats.blocks import block_names
from service.space.recipe_form import DEMO_MODELS
from service.space.search_form import FIRST_SEARCH, search_examples
from service.space.search_form import to_yaml as spec_yaml

pytestmark = pytest.mark.slow

__all__ = ["browser", "demo_space"]  # the fixtures, used by this module's tests

VALUES = [f"{0.04 * i:g}" for i in range(len(block_names("sd1")))]
SD_RECIPE = f"""merge_method: linear
models:
  - model: demo/sd-base
    parameters: {{weight: {{blocks: [{", ".join(VALUES)}]}}}}
  - model: demo/sd-dreamy
    parameters: {{weight: 1}}
"""
"""An SD1.5 merge weighted per block: one distinct value per block for the first model."""
LM_RECIPE = """merge_method: ties
base_model: demo/base
models:
  - model: demo/math
    parameters: {weight: 0.9, density: 0.4}
  - model: demo/code
    parameters: {weight: 0.6, density: 0.7}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def space(demo_space):
    return demo_space


def submitted(space, recipe: str, target: str) -> str:
    """The id of the demo user's merge of ``recipe`` into ``target``, queued by the API."""
    status, job = space.submit(recipe, target, "tok-demo")
    assert status == 202, job
    return job["id"]


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def open_job(page, table: str, job_id: str) -> None:
    open_tab(page, "Jobs")
    page.locator(table).get_by_role("gridcell", name=job_id).click()


def expect_panel_in_view(page, job_id: str, prefix: str = "") -> None:
    """The job's panel is open on its tab, its status in the window (not far below it)."""
    expect(field(page, f"#{prefix}job-id")).to_have_value(job_id)
    status = page.locator(f"#{prefix}job-status" if not prefix else "#search-status")
    expect(status).to_contain_text("succeeded")
    expect(status).to_be_in_viewport()


def test_your_jobs_says_how_to_get_some_and_a_job_opened_is_a_copy_to_run_again(browser, space):
    with space_page(browser, space.url) as page:
        page.set_viewport_size({"width": 1300, "height": 900})  # the panel is below the form
        open_tab(page, "Jobs")
        hint = page.locator("#my-jobs-hint")
        expect(hint).to_contain_text("Sign in with Hugging Face")
        expect(hint).to_contain_text("to see your jobs here")

        page.get_by_role("button", name=re.compile("Sign in")).click()
        expect_text(page, "#who", r"Signed in as demo")
        open_tab(page, "Jobs")
        expect(hint).to_contain_text("No jobs yet: load an example in New merge and press Merge")

        sd_job = submitted(space, SD_RECIPE, "demo/sd-blocks")
        lm_job = submitted(space, LM_RECIPE, "demo/lm-ties")
        expect(page.locator("#my-jobs").get_by_role("gridcell", name=lm_job)).to_be_visible()
        expect(hint).to_have_text("")
        assert space.wait_done(sd_job)["status"] == "succeeded"
        assert space.wait_done(lm_job)["status"] == "succeeded"

        # the block-weighted SD merge: its rows, its block values, a new target, its panel
        open_job(page, "#my-jobs", sd_job)
        expect(field(page, "#method")).to_have_value("linear")
        expect(field(page, "#model-0-repo")).to_have_value("demo/sd-base")
        expect(field(page, "#model-0-blocks")).to_have_value(",".join(VALUES))
        expect(field(page, "#model-1-repo")).to_have_value("demo/sd-dreamy")
        expect(field(page, "#model-1-weight")).to_have_value("1")
        expect(page.locator("#model-2-repo")).to_be_hidden()
        expect(field(page, "#target")).to_have_value("demo/sd-blocks-2")
        expect(page.locator("#copied-from")).to_contain_text(f"A copy of job {sd_job}")
        expect_panel_in_view(page, sd_job)
        expect(page.locator("#model-0-blocks")).to_contain_text("BASE IN00")  # inspected: SD1.5
        shot(page, "job-opened-as-a-copy")
        page.locator("#validate").click()
        assert "valid: linear" in expect_text(page, "#outcome", "valid")

        # the language-model merge: base, per-model values, dtype; no block rows
        open_job(page, "#my-jobs", lm_job)
        expect(field(page, "#method")).to_have_value("ties")
        expect(field(page, "#base-model")).to_have_value("demo/base")
        for row, (repo, weight, density) in enumerate(
            (("demo/math", "0.9", "0.4"), ("demo/code", "0.6", "0.7"))
        ):
            expect(field(page, f"#model-{row}-repo")).to_have_value(repo)
            expect(field(page, f"#model-{row}-weight")).to_have_value(weight)
            expect(field(page, f"#model-{row}-density")).to_have_value(density)
            expect(page.locator(f"#model-{row}-blocks")).to_be_hidden()
        expect(field(page, "#dtype")).to_have_value("bfloat16")
        expect(field(page, "#target")).to_have_value("demo/lm-ties-2")
        expect(page.locator("#copied-from")).to_contain_text(f"A copy of job {lm_job}")
        expect_panel_in_view(page, lm_job)


WATCH = """(selector) => {
  window.touched = [];
  new MutationObserver((changes) => window.touched.push(...changes.map((c) => c.type)))
    .observe(document.querySelector(selector),
             {subtree: true, childList: true, attributes: true, characterData: true});
}"""
"""Record every change to the element, its progress overlay (Gradio's status tracker) included."""
SETTLED = """(selector) => {
  const tracker = document.querySelector(`${selector} [data-testid=status-tracker]`);
  return tracker && tracker.innerText.trim() === '' && !tracker.className.includes('translucent');
}"""
"""No event is pending on the element: its overlay shows neither a timer nor a queue."""


def expect_left_alone(page, selector: str, job_id: str, ticks: int = 3) -> None:
    """While the page's other timer (the Jobs tables') ticks ``ticks`` times, no request
    names the finished job ``job_id`` and its status area ``selector`` is not touched."""
    # On a loaded machine the queue drains slowly: the reads the timer sent before the job
    # ended may take a while to come back, as the job itself did.
    page.wait_for_function(SETTLED, arg=selector, timeout=120_000)
    # A read its timer sent just before the job's end stopped it shows as pending only once
    # sent: after a tick of the other timer it has been sent, if at all, and is awaited.
    with page.expect_request(lambda r: "/queue/join" in r.url):
        pass
    page.wait_for_function(SETTLED, arg=selector, timeout=120_000)
    page.evaluate(WATCH, selector)
    asked = []
    page.on("request", lambda r: asked.append(r.post_data or "") if "/queue/join" in r.url else 0)
    for _ in range(ticks):
        with page.expect_request(lambda r: "/queue/join" in r.url):
            pass
    assert page.evaluate("window.touched") == []
    assert not [body for body in asked if job_id in body]


def test_a_finished_job_is_left_alone_and_its_link_says_the_hub_is_local(browser, space):
    search = replace(search_examples(DEMO_MODELS)[FIRST_SEARCH], trials=4, population=4)
    status, job = space.call(
        "POST",
        "/api/searches",
        {"spec": spec_yaml(search), "target": "demo/searched"},
        "tok-demo",
    )
    assert status == 202, job
    search_job = job["id"]
    merge_job = submitted(space, LM_RECIPE, "demo/watched")  # bfloat16, beside the search
    local = f"on the local demo hub at {space.sandbox.url}"
    with space_page(browser, space.url) as page:
        set_value(page, "#job-id", merge_job)
        expect_text(page, "#job-status", r"succeeded", timeout=120_000)
        expect(page.locator("#job-link a")).to_have_text("demo/watched")
        expect(page.locator("#job-link")).to_contain_text(local)
        expect_left_alone(page, "#job-status", merge_job)

        assert space.wait_done(search_job)["status"] == "succeeded"
        open_job(page, "#public-jobs", search_job)
        expect_panel_in_view(page, search_job, prefix="search-")
        expect(page.locator("#search-link a")).to_have_text("demo/searched")
        expect(page.locator("#search-link")).to_contain_text(local)
        expect_left_alone(page, "#search-status", search_job)
