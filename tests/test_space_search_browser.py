"""The Space's Search tab in a real browser (Debian's Chromium driven by Playwright), against
``mergebot serve`` on 127.0.0.1 with the sandbox hub's demo models: the example search
validated, started, watched trial by trial and followed to its published model. Screenshots go
to ``test-artifacts/screenshots/search-*.png``."""

from __future__ import annotations

import re

import pytest
from browser_env import (
    browser,
    choose,
    demo_space,
    expect_text,
    field,
    set_value,
    shot,
    space_page,
)
from playwright.sync_api import expect
from service_env import BOT_TOKEN

from merge_engine.evolve.report import wall_time_text
from service.space.search_form import FIRST_SEARCH

pytestmark = pytest.mark.slow

__all__ = ["browser", "demo_space"]  # the fixtures, used by this module's tests

RECORD_STATES = """() => {
  window.searchStates = [];
  window.progressLines = new Set();
  const read = () => {
    const line = document.querySelector('#search-status .search-progress');
    if (line) window.progressLines.add(line.textContent);
    const done = document.querySelector('#search-status .done');
    const best = document.querySelector('#search-status .best');
    if (!done || !best) return;
    const state = [Number(done.textContent), best.textContent];
    const last = window.searchStates[window.searchStates.length - 1];
    if (!last || last[0] !== state[0] || last[1] !== state[1]) window.searchStates.push(state);
  };
  new MutationObserver(read).observe(
    document.body, {subtree: true, childList: true, characterData: true});
}"""
"""Record every (trials done, best fitness) the page shows, as the poll redraws it, and every
progress line."""
WATCHED_LIVE = """(budget) => {
  const seen = window.searchStates.filter(([done]) => done > 0);
  const partial = seen.filter(([done]) => done < budget);
  const bests = new Set(seen.map(([, best]) => best));
  return partial.length > 0 && seen.some(([done]) => done > partial[0][0]) && bests.size > 1;
}"""
"""The page showed a search part way (some trials of the budget), then more trials, and the
best fitness changed while it watched."""
FITNESS_ROWS = """(root) => {
  const table = [...document.querySelectorAll(root + ' table')].find(
    (t) => t.querySelector('tr').innerText.includes('search fitness'));
  return [...table.querySelectorAll('tr')].map(
    (row) => [...row.querySelectorAll('th, td')].map((cell) => cell.innerText.trim()));
}"""
"""The rows (header first) of the fitness table under ``root``, each a list of cell texts."""


@pytest.fixture(scope="module")
def space(demo_space):
    return demo_space


@pytest.fixture
def page(browser, space):
    with space_page(browser, space.url) as page:
        page.get_by_role("tab", name="Search", exact=True).click()
        expect(field(page, "#search-example")).to_have_value(FIRST_SEARCH)
        expect(field(page, "#search-target")).to_have_value("mergebot/ties-search")
        yield page


def load_example(page, name: str) -> None:
    """Load an example and wait for the load's own answer. The page may show that example
    already, so its fields prove nothing; the target, which a load always rewrites, first
    holds a name no load proposes. (Gradio runs different events of a page at once: an edit
    made before the load's answer lands is overwritten by it.)"""
    choose(page, "#search-example", name)
    set_value(page, "#search-target", "waiting/for-the-load")
    page.locator("#load-search-example").click()
    expect(field(page, "#search-target")).not_to_have_value("waiting/for-the-load")
    expect(field(page, "#search-sources")).to_have_value("demo/math\ndemo/code")


def open_search_tab(page, name: str) -> None:
    """The Form or YAML tab of the search (the merge form has tabs of the same names)."""
    page.locator("#search-tab").get_by_role("tab", name=name, exact=True).click()


def jobs_count(space) -> int:
    return len(space.call("GET", "/api/jobs")[1])


def test_the_example_search_runs_live_to_its_published_model(page, space):
    load_example(page, FIRST_SEARCH)
    set_value(page, "#search-target", "mergebot/searched-in-the-space")
    shot(page, "search-form")
    open_search_tab(page, "YAML")
    yaml_field = field(page, "#search-yaml")
    expect(yaml_field).to_have_value(re.compile(r"model: demo/math"))
    budget = int(re.search(r"trials: (\d+)", yaml_field.input_value())[1])
    page.locator("#search-validate").click()
    valid = expect_text(page, "#search-outcome", "valid")
    assert f"valid: a parameters search (ties), {budget} trials; task nll: 9 search" in valid
    assert "3 held-out examples" in valid and "demo/math@" in valid

    page.evaluate(RECORD_STATES)
    page.locator("#search-start").click()
    said = expect_text(page, "#search-outcome", r"Job search-\w+")
    job_id = re.search(r"Job (search-\w+)", said)[1]  # the text may hold a timer too
    expect(field(page, "#search-job-id")).to_have_value(job_id)
    page.wait_for_function(WATCHED_LIVE, arg=budget, timeout=120_000)
    expect(page.locator("#search-plot img")).to_be_visible()
    shot(page, "search-running")

    expect_text(page, "#search-status", r"succeeded", timeout=120_000)
    expect(page.locator("#search-status .done")).to_have_text(str(budget))
    expect_text(page, "#search-outcome", rf"Job {job_id} succeeded\.")
    # the fitness table: the winner and each source, once the search has ended
    table = page.locator("#search-status table.fitness").inner_text()
    assert "winner" in table and "source demo/math" in table and "source demo/code" in table
    assert "genes:" in page.locator("#search-best").inner_text()
    expect(page.locator("#search-card")).to_contain_text("Evolutionary search")
    shot(page, "search-finished")
    # while it ran, the time shown was the wall-time budget left, said as such
    lines = page.evaluate("[...window.progressLines]")
    timed = [line for line in lines if "left" in line]
    assert timed and all(" · wall-time budget left " in line for line in timed), lines
    # the card's fitness table: a column per task (the example's one task is named after its
    # kind, nll, and heads its column once), and the status table's numbers as it writes them
    card_rows = page.evaluate(FITNESS_ROWS, "#search-card")
    assert card_rows[0] == ["model", "search fitness", "held-out fitness", "nll"]
    status_rows = page.evaluate(FITNESS_ROWS, "#search-status")
    card_numbers = {row[0]: row[1:3] for row in card_rows[1:]}
    card_numbers["winner"] = card_numbers.pop("this merge")
    assert {row[0]: row[1:] for row in status_rows[1:]} == card_numbers
    # the card's duration is the search stage's time in the job's log
    log = field(page, "#search-log").input_value()
    seconds = float(re.search(r"^search: done in ([\d.]+) s$", log, re.MULTILINE)[1])
    assert f"trials in {wall_time_text(seconds)}." in page.locator("#search-card").inner_text()

    job = space.call("GET", f"/api/jobs/{job_id}", token=BOT_TOKEN)[1]
    link = page.locator("#search-link a")
    expect(link).to_have_text("mergebot/searched-in-the-space")
    assert link.get_attribute("href") == job["url"]
    with page.context.expect_page() as opened:  # the link opens the model page beside this one
        link.click()
    model_page = opened.value
    expect(model_page.locator("body")).to_contain_text("Evolutionary search")
    assert job_id in model_page.locator("body").inner_text()
    model_page.close()

    # the Jobs tab lists it as a search; a click opens it in the Search tab
    page.get_by_role("tab", name="Jobs", exact=True).click()
    row = page.locator("#public-jobs").get_by_role("row", name=re.compile(job_id))
    expect(row.get_by_role("gridcell", name="search", exact=True)).to_be_visible()
    row.get_by_role("gridcell", name=job_id).click()
    expect(field(page, "#search-job-id")).to_have_value(job_id)
    expect(page.locator("#search-job-id")).to_be_visible()
    expect_text(page, "#search-status", r"succeeded")


def test_the_tab_says_how_a_search_works(page):
    intro = page.locator("#search-tab").inner_text()
    assert "docs/evolve.md" not in intro  # a Space's visitor has no copy of the docs
    how = page.locator("#search-how")
    expect(how).not_to_contain_text("held-out")  # closed
    how.get_by_text("How a search works").click()
    expect(how).to_contain_text("The fitness is the weighted mean over the tasks")
    for essential in ("held-out", "Baselines", "wall time", "The YAML tab"):
        assert essential in how.inner_text(), essential


def test_a_bad_field_shows_one_sentence_naming_it_and_starts_nothing(page, space):
    before = jobs_count(space)
    load_example(page, FIRST_SEARCH)
    set_value(page, "#search-trials", "0")  # the form writes the YAML
    open_search_tab(page, "YAML")
    expect(field(page, "#search-yaml")).to_have_value(re.compile(r"trials: 0\b"))
    page.locator("#search-validate").click()
    error = expect_text(page, "#search-outcome", "Not valid")
    line = 1 + next(
        i
        for i, text in enumerate(field(page, "#search-yaml").input_value().splitlines())
        if "trials: 0" in text
    )
    assert f"budget.trials: must be greater than 0, got 0 (line {line} of the YAML)" in error
    page.locator("#search-start").click()
    expect_text(page, "#search-outcome", "Not started: budget.trials")
    assert jobs_count(space) == before


def test_yaml_edits_fill_the_form_and_keep_what_it_cannot_show(page):
    load_example(page, FIRST_SEARCH)
    open_search_tab(page, "YAML")
    text = field(page, "#search-yaml").input_value()
    set_value(page, "#search-yaml", text.replace("method: ties", "method: tie") + "seed: 7\n")
    open_search_tab(page, "Form")
    expect(field(page, "#search-method")).to_have_value("tie")  # not offered, yet shown
    expect(page.locator("#search-notice")).to_contain_text("shown in the YAML tab only: seed")
    set_value(page, "#search-wall-time", "5m")
    open_search_tab(page, "YAML")
    yaml_field = field(page, "#search-yaml")
    expect(yaml_field).to_have_value(re.compile(r"wall_time: 5m"))
    assert "seed: 7" in yaml_field.input_value() and "method: tie\n" in yaml_field.input_value()
    page.locator("#search-validate").click()
    assert "parameters.method: " in expect_text(page, "#search-outcome", "Not valid")


def test_a_signed_in_search_stops_early_and_publishes_its_best_so_far(page):
    page.get_by_role("button", name=re.compile("Sign in")).click()
    expect_text(page, "#who", "Signed in as demo")
    page.get_by_role("tab", name="Search", exact=True).click()
    expect(field(page, "#search-target")).to_have_value("demo/ties-search")
    load_example(page, FIRST_SEARCH)
    set_value(page, "#search-trials", "200")
    open_search_tab(page, "YAML")
    expect(field(page, "#search-yaml")).to_have_value(re.compile(r"trials: 200\b"))
    page.locator("#search-start").click()
    said = expect_text(page, "#search-outcome", r"Job search-\w+")
    job_id = re.search(r"Job (search-\w+)", said)[1]
    expect_text(page, "#search-status .done", r"^([2-9]|\d\d+)$", timeout=120_000)

    page.locator("#search-publish-best").click()
    expect(field(page, "#search-log")).to_have_value(
        re.compile("stop requested: publishing the best")
    )
    expect_text(page, "#search-status", "succeeded", timeout=120_000)
    expect_text(page, "#search-outcome", rf"Job {job_id} succeeded\.")
    assert 2 <= int(page.locator("#search-status .done").inner_text()) < 200
    expect(page.locator("#search-link a")).to_have_text("demo/ties-search")
    assert "winner" in page.locator("#search-status table.fitness").inner_text()
