"""The Space in a real browser: Debian's Chromium driven by Playwright (no browser download),
against ``mergebot serve`` on 127.0.0.1 with the sandbox hub. Screenshots of the form, a
running job and a finished job go to ``test-artifacts/screenshots``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from browser_env import (
    browser,
    choose,
    demo_hub,
    expect_text,
    field,
    page,
    serving_space,
    set_value,
    shot,
    value,
)
from huggingface_hub import HfApi
from playwright.sync_api import expect
from rendered import HOSTILE
from safetensors.torch import load, save

pytestmark = pytest.mark.slow

__all__ = ["browser", "page"]  # the fixtures, used by this module's tests

SLERP = """merge_method: slerp
base_model: demo/math
models:
  - model: demo/math
  - model: demo/code
parameters:
  t: 0.3
"""


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The sandbox hub with the demo models (and one missing a tensor), and the bot serving
    the Space; the local sign-in is the demo user."""
    server = demo_hub()
    api = HfApi(endpoint=server.url, token="tok-demo")
    weights = load(
        Path(
            api.hf_hub_download(
                "demo/math", "model.safetensors", cache_dir=tmp_path_factory.mktemp("c")
            )
        ).read_bytes()
    )
    weights.pop("model.layers.1.mlp.up_proj.weight")
    api.create_repo("demo/broken")
    api.upload_file(
        repo_id="demo/broken",
        path_or_fileobj=io.BytesIO(save(weights)),
        path_in_repo="model.safetensors",
    )
    api.upload_file(
        repo_id="demo/broken",
        path_or_fileobj=api.hf_hub_download(
            "demo/math", "config.json", cache_dir=tmp_path_factory.mktemp("c")
        ),
        path_in_repo="config.json",
    )
    with serving_space(server, tmp_path_factory.mktemp("space") / "work") as bot:
        yield bot
    server.__exit__()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_for_yaml(page, pattern: str) -> None:
    """Wait until a form edit has reached the YAML (its own event; Validate reads the YAML),
    then come back to the form."""
    open_tab(page, "YAML")
    expect(field(page, "#recipe-yaml")).to_have_value(re.compile(pattern))
    open_tab(page, "Form")


def load_example(page, name: str) -> None:
    choose(page, "#example", name)
    page.locator("#load-example").click()


def jobs_count(space) -> int:
    return len(space.call("GET", "/api/jobs")[1])


def test_sign_in_fill_validate_merge_and_find_the_card(page, space):
    page.get_by_role("button", name=re.compile("Sign in")).click()
    expect_text(page, "#who", r"Signed in as demo")
    page.wait_for_selector("#method input")
    load_example(page, "TIES: a base and 3 fine-tunes")
    expect(field(page, "#model-2-repo")).to_have_value("demo/chat")
    assert value(page, "#base-model") == "demo/base" and value(page, "#model-1-density") == "0.5"
    set_value(page, "#target", "demo/ties-from-the-space")
    page.locator("#validate").click()
    assert "valid: ties" in expect_text(page, "#outcome", "valid")
    shot(page, "form")

    page.locator("#merge").click()
    # the element's text may begin with Gradio's progress timer
    job_id = re.search(r"Job (job-\w+)", expect_text(page, "#outcome", r"Job job-\w+"))[1]
    expect(field(page, "#job-id")).to_have_value(job_id)
    expect_text(page, "#job-status", r"queued|running|succeeded")
    shot(page, "running-job")
    expect_text(page, "#job-status", r"succeeded", timeout=120_000)
    # the line under the buttons follows the job instead of saying it is still queued
    expect_text(page, "#outcome", rf"Job {job_id} succeeded\.")
    shot(page, "finished-job")
    assert "publish" in value(page, "#job-log")
    # a bar per stage and one overall, all full; a summary of what was made
    bars = page.locator("#job-status progress")
    expect(bars).to_have_count(7)
    assert bars.evaluate_all("bs => bs.map(b => b.value)") == [1.0] * 7
    summary = page.locator("#job-status .summary").inner_text()
    assert "method: ties" in summary and "demo/math@" in summary and "demo/base@" in summary
    assert re.search(r"merge \d+\.\d s", summary) and "total" in summary
    expect(page.locator("#job-status .summary")).to_contain_text(
        re.compile(r"size: \d+\.\d [kMG]B of weights")
    )

    # after a reload the job comes back
    page.reload()
    expect(field(page, "#job-id")).to_have_value(job_id)
    expect_text(page, "#job-status", r"succeeded")

    # another example starts afresh: no previous job, log or message
    load_example(page, "SLERP of two models")
    expect(field(page, "#method")).to_have_value("slerp")
    expect(field(page, "#job-id")).to_have_value("")
    expect(field(page, "#job-log")).to_have_value("")
    expect(page.locator("#outcome")).to_have_text("")

    # the Jobs tab says that a row opens its job, and one does
    open_tab(page, "Jobs")
    assert "Click a row to open" in expect_text(page, "#jobs-help", "Click a row")
    page.locator("#my-jobs").get_by_role("gridcell", name=job_id).click()
    expect(field(page, "#job-id")).to_have_value(job_id)  # shown on the New merge tab
    expect(page.locator("#job-id")).to_be_visible()
    expect_text(page, "#job-status", r"succeeded")

    page.goto(space.sandbox.url + "/demo/ties-from-the-space")
    card = page.locator("body").inner_text()
    assert job_id in card and "TIES" in card
    for repo in ("demo/base", "demo/math", "demo/code", "demo/chat"):
        assert repo in card


def test_yaml_fills_the_form_and_the_form_writes_the_yaml(page):
    open_tab(page, "YAML")
    set_value(page, "#recipe-yaml", SLERP)
    open_tab(page, "Form")
    expect(field(page, "#method")).to_have_value("slerp")
    expect(field(page, "#param-t")).to_have_value("0.3")
    expect(field(page, "#model-0-repo")).to_have_value("demo/math")
    expect(field(page, "#model-1-repo")).to_have_value("demo/code")
    expect(field(page, "#base-model")).to_have_value("demo/math")
    expect(page.locator("#model-0-density")).to_be_hidden()  # slerp has no per-model density

    set_value(page, "#model-1-repo", "demo/chat")
    set_value(page, "#param-t", "0.7")
    open_tab(page, "YAML")
    # wait for both edits to reach the YAML (each is its own event), never for a time
    yaml_field = field(page, "#recipe-yaml")
    expect(yaml_field).to_have_value(re.compile(r"t: 0\.7"))
    expect(yaml_field).to_have_value(re.compile(r"model: demo/chat"))
    assert "demo/code" not in yaml_field.input_value()


def test_the_first_example_shown_is_the_one_loaded(page):
    expect(field(page, "#example")).to_have_value("TIES: a base and 3 fine-tunes")
    expect(field(page, "#method")).to_have_value("ties")
    expect(field(page, "#model-2-repo")).to_have_value("demo/chat")


def test_a_field_shared_by_methods_shows_each_method_its_own_help_and_default(page):
    choose(page, "#method", "slerp")
    t = page.locator("#param-t")
    expect(t).to_contain_text("0 gives the base model, 1 the other model")
    expect(t).to_contain_text("required")
    expect(t).not_to_contain_text("distance below which")
    choose(page, "#method", "nearswap")
    expect(t).to_contain_text("distance below which the other model's value is taken")
    expect(t).to_contain_text("[0, inf)")
    expect(t).not_to_contain_text("0 gives the base model")

    choose(page, "#method", "ties")
    expect(page.locator("#param-normalize")).to_contain_text("default true")
    expect(page.locator("#param-normalize input")).to_be_checked()
    choose(page, "#method", "task_arithmetic")  # the same name, another default
    expect(page.locator("#param-normalize")).to_contain_text("default false")
    expect(page.locator("#param-normalize input")).not_to_be_checked()
    open_tab(page, "YAML")
    expect(field(page, "#recipe-yaml")).to_have_value(re.compile("merge_method: task_arithmetic"))
    assert "normalize" not in field(page, "#recipe-yaml").input_value()


def test_the_layer_field_says_its_range_is_half_open(page):
    layers = page.locator("#model-0-layers")
    expect(layers).to_contain_text("[start-end)")
    expect(layers).to_contain_text("0-3 takes layers 0, 1 and 2, not 3")


def test_an_error_shows_on_the_yaml_tab_when_validated_from_there(page):
    open_tab(page, "YAML")
    text = value(page, "#recipe-yaml").replace("density: 0.5", "density: 1.5", 1)
    set_value(page, "#recipe-yaml", text)
    expect(field(page, "#model-0-density")).to_have_value("1.5")  # the form follows
    page.locator("#validate").click()
    line = 1 + next(i for i, t in enumerate(text.splitlines()) if "density: 1.5" in t)
    error = expect_text(page, "#error-recipe", "⚠")
    assert f"line {line}: models[0].parameters.density" in error and "out of range" in error
    assert page.locator("#error-recipe").is_visible()
    assert "under the YAML" in page.locator("#outcome").inner_text()
    assert page.locator("#error-model-0").inner_text().strip() == ""


def test_a_yaml_error_is_shown_whole(page):
    open_tab(page, "YAML")
    set_value(page, "#recipe-yaml", "merge_method: ties\nmodels: [demo/math, demo/code")
    shown = expect_text(page, "#error-recipe", "not valid YAML")
    assert "but got '<stream end>'" in shown  # typed: the live check
    page.locator("#validate").click()
    expect_text(page, "#outcome", "Not valid")
    assert "line 2, column" in expect_text(page, "#error-recipe", "<stream end>")


def test_loading_an_example_clears_the_previous_error(page):
    set_value(page, "#model-0-density", "1.5")
    wait_for_yaml(page, "density: 1.5")
    page.locator("#validate").click()
    expect_text(page, "#error-model-0", "⚠")
    load_example(page, "Frankenmerge (layer stacking)")
    expect(field(page, "#model-1-layers")).to_have_value("1-4")
    expect(page.locator("#error-model-0")).to_have_text("")
    expect(page.locator("#outcome")).to_have_text("")


@pytest.mark.parametrize(
    ("field", "text", "error_at", "words"),
    [
        ("#model-0-density", "1.5", "#error-model-0", "density"),
        ("#model-1-repo", "demo/broken", "#error-model-1", "demo/broken"),
    ],
)
def test_a_bad_recipe_shows_its_error_by_the_field_and_submits_nothing(
    page, space, field, text, error_at, words
):
    before = jobs_count(space)
    set_value(page, field, text)
    wait_for_yaml(page, re.escape(text))
    set_value(page, "#target", "mergebot/never")  # not signed in: the bot's namespace
    page.locator("#validate").click()
    assert words in expect_text(page, error_at, "⚠")
    page.locator("#merge").click()
    expect_text(page, "#outcome", "Not submitted")
    assert words in page.locator(error_at).inner_text()
    assert page.locator("#error-target").inner_text().strip() == ""
    assert jobs_count(space) == before


def test_a_job_whose_recipe_carries_markup_shows_it_as_text(page, space):
    """A calibration field name is free text; the job's card, as the page shows it, holds it
    as text in the calibration table and the recipe, and no element is made from it."""
    recipe = f"""merge_method: fisher
models: [{{model: demo/math}}, {{model: demo/code}}]
calibration:
  examples: ["abc def", "the cat sat", "one two three"]
  text_field: {json.dumps(f"x` {HOSTILE} `y")}
"""
    status, job = space.submit(recipe, "demo/fields-as-code", "tok-demo")
    assert status == 202, job
    assert space.wait_done(job["id"])["status"] == "succeeded"
    set_value(page, "#job-id", job["id"])
    expect_text(page, "#job-status", r"succeeded")
    page.get_by_role("button", name=re.compile("^Model card")).click()
    expect(page.locator("#job-card")).to_contain_text("onerror=alert(1)")
    expect(page.locator("#job-card")).to_contain_text("Calibration data")
    made = page.locator("img[src='x'], a[href*='evil.example'], a[href^='javascript:']")
    assert made.count() == 0


def test_a_backtracking_discard_validates_while_the_bot_answers(page, space):
    """Python's re took 2^len(name) steps on every tensor name for this pattern, holding the
    GIL: the Space, the API and the worker all stopped."""
    open_tab(page, "YAML")
    set_value(page, "#recipe-yaml", SLERP + "discard: ['([\\w.]+)+!']\n")
    page.locator("#validate").click()
    space.healthy_while(
        lambda: not re.search("✓ valid|Not valid", page.locator("#outcome").inner_text())
    )
    assert "✓ valid: slerp" in page.locator("#outcome").inner_text()

    set_value(page, "#recipe-yaml", SLERP + "discard: ['^(?!model)']\n")
    page.locator("#validate").click()
    error = expect_text(page, "#error-recipe", "⚠")
    assert "discard[0]" in error and "uses lookaround" in error


def test_pasted_yaml_is_read_within_the_recipe_limits_as_it_is_typed(page):
    open_tab(page, "YAML")
    set_value(page, "#recipe-yaml", "merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000)
    assert "deeper than the 32 levels allowed" in expect_text(page, "#error-recipe", "⚠")
