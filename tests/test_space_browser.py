"""The Space in a real browser: Debian's Chromium driven by Playwright (no browser download),
against ``mergebot serve`` on 127.0.0.1 with the sandbox hub. Screenshots of the form, a
running job and a finished job go to ``test-artifacts/screenshots``."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from safetensors.torch import load, save
from service_env import BOT_TOKEN, start_serve, wait_until

from service.sandbox_hub import HubStore, SandboxHub, SandboxServer
from service.sandbox_hub.seed import seed_examples
from service.server import MOCK_OAUTH_TOKEN

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
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
    users = {"tok-demo": "demo", MOCK_OAUTH_TOKEN: "demo", BOT_TOKEN: "mergebot"}
    hub = SandboxHub(HubStore(), users=users)
    seed_examples(hub.store, "demo")
    server = SandboxServer(hub).__enter__()
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
    work = tmp_path_factory.mktemp("space") / "work"
    process, bot = start_serve(server.url, work, MERGEBOT_LOCAL_LOGIN_TOKEN="tok-demo")
    bot.sandbox, bot.process = server, process
    yield bot
    process.stop()
    server.__exit__()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, space):
    context = browser.new_context(viewport={"width": 1300, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(space.url + "/")
    page.wait_for_selector("#method input")
    expect_text(page, "#who", "results go to")
    yield page
    context.close()


def expect_text(page, selector: str, pattern: str, timeout: float = 60_000) -> str:
    """Wait until the element's text matches ``pattern``; return the text."""
    page.wait_for_function(
        "([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test(e.innerText); }",
        arg=[selector, pattern],
        timeout=timeout,
    )
    return page.locator(selector).inner_text()


def value(page, selector: str) -> str:
    return page.locator(f"{selector} input, {selector} textarea").first.input_value()


def set_value(page, selector: str, text: str) -> None:
    """Type into a field as a person does: Gradio's ``input`` event follows key presses."""
    field = page.locator(f"{selector} input, {selector} textarea").first
    if field.evaluate("e => e.tagName") == "TEXTAREA":
        field.fill(text[:-1])
        field.press("End")
        page.keyboard.type(text[-1])
    else:  # a number: typed digit by digit it would pass through "0." and lose the dot
        field.fill(text)
    field.press("Tab")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def jobs_count(space) -> int:
    return len(space.call("GET", "/api/jobs")[1])


def test_sign_in_fill_validate_merge_and_find_the_card(page, space):
    page.get_by_role("button", name=re.compile("Sign in")).click()
    expect_text(page, "#who", r"Signed in as demo")
    page.wait_for_selector("#method input")
    page.locator("#example input").click()
    page.get_by_role("option", name="TIES of three").click()
    page.locator("#load-example").click()
    wait_until(lambda: value(page, "#model-2-repo") == "demo/chat", "the example in the form", 30)
    assert value(page, "#base-model") == "demo/base" and value(page, "#model-1-density") == "0.5"
    set_value(page, "#target", "demo/ties-from-the-space")
    page.locator("#validate").click()
    assert "valid: ties" in expect_text(page, "#outcome", "valid")
    shot(page, "form")

    page.locator("#merge").click()
    job_id = expect_text(page, "#outcome", r"Job job-\w+").split()[1]
    wait_until(lambda: value(page, "#job-id") == job_id, "the job id in the panel", deadline=30)
    expect_text(page, "#job-status", r"queued|running|succeeded")
    shot(page, "running-job")
    expect_text(page, "#job-status", r"succeeded", timeout=120_000)
    shot(page, "finished-job")
    assert "publish" in value(page, "#job-log")

    link = page.locator("#job-link a").get_attribute("href")
    assert link == f"{space.sandbox.url}/demo/ties-from-the-space"
    page.goto(link)
    card = page.locator("body").inner_text()
    assert job_id in card and "TIES" in card
    for repo in ("demo/base", "demo/math", "demo/code", "demo/chat"):
        assert repo in card


def test_yaml_fills_the_form_and_the_form_writes_the_yaml(page):
    open_tab(page, "YAML")
    set_value(page, "#recipe-yaml", SLERP)
    open_tab(page, "Form")
    wait_until(lambda: value(page, "#method") == "slerp", "the form to follow the YAML", 30)
    assert value(page, "#param-t") == "0.3"
    assert (value(page, "#model-0-repo"), value(page, "#model-1-repo")) == (
        "demo/math",
        "demo/code",
    )
    assert value(page, "#base-model") == "demo/math"
    assert not page.locator("#model-0-density").is_visible()  # slerp has no per-model density

    set_value(page, "#model-1-repo", "demo/chat")
    set_value(page, "#param-t", "0.7")
    open_tab(page, "YAML")
    wait_until(
        lambda: "demo/chat" in value(page, "#recipe-yaml"),
        "the YAML to follow the form",
        deadline=30,
    )
    recipe = value(page, "#recipe-yaml")
    assert "t: 0.7" in recipe and "demo/code" not in recipe


@pytest.mark.parametrize(
    ("field", "text", "error_at", "words"),
    [
        ("#model-0-density", "1.5", "#error-models", "density"),
        ("#model-1-repo", "demo/broken", "#error-models", "demo/broken"),
    ],
)
def test_a_bad_recipe_shows_its_error_by_the_field_and_submits_nothing(
    page, space, field, text, error_at, words
):
    before = jobs_count(space)
    set_value(page, field, text)
    set_value(page, "#target", "mergebot/never")  # not signed in: the bot's namespace
    page.locator("#validate").click()
    assert words in expect_text(page, error_at, "⚠")
    page.locator("#merge").click()
    expect_text(page, "#outcome", "Not submitted")
    assert words in page.locator(error_at).inner_text()
    assert page.locator("#error-target").inner_text().strip() == ""
    assert jobs_count(space) == before
