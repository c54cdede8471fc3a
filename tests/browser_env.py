"""The browser the Space tests drive: Debian's Chromium through Playwright (no browser
download), the demo hub and Space they open, and the small waits and reads they share. A
helper module, not a test file."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from service_env import BOT_TOKEN, start_serve

from service.demo import seed_examples
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer
from service.server import MOCK_OAUTH_TOKEN

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a loaded CI machine answers slowly; states, not time

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


def demo_hub() -> SandboxServer:
    """The sandbox hub, started, with the demo models; the Space's local sign-in is ``demo``."""
    users = {"tok-demo": "demo", MOCK_OAUTH_TOKEN: "demo", BOT_TOKEN: "mergebot"}
    hub = SandboxHub(HubStore(), users=users)
    seed_examples(hub.store, "demo")
    return SandboxServer(hub).__enter__()


@contextmanager
def serving_space(server: SandboxServer, work: Path) -> Iterator:
    """``mergebot serve`` on ``server`` (its sign-in the demo user), stopped afterwards; the
    API client it yields also holds the hub (``sandbox``) and the process."""
    process, bot = start_serve(server.url, work, MERGEBOT_LOCAL_LOGIN_TOKEN="tok-demo")
    bot.sandbox, bot.process = server, process
    try:
        yield bot
    finally:
        process.stop()


@pytest.fixture(scope="module")
def demo_space(tmp_path_factory):
    """The sandbox hub with the demo models (language models and SD1.5 pipelines), and the bot
    serving the Space; the local sign-in is the demo user. A module that needs no other
    models uses it as its ``space``."""
    server = demo_hub()
    with serving_space(server, tmp_path_factory.mktemp("space") / "work") as bot:
        yield bot
    server.__exit__()


@contextmanager
def space_page(browser, url: str) -> Iterator:
    """A fresh browser context on the Space at ``url``, once it has greeted the visitor."""
    context = browser.new_context(viewport={"width": 1300, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url + "/")
    expect_text(page, "#who", "results go to")
    try:
        yield page
    finally:
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
    if text and field.evaluate("e => e.tagName") == "TEXTAREA":
        field.fill(text[:-1])
        field.press("End")
        page.keyboard.type(text[-1])
    else:  # emptied, or a number: typed digit by digit it would pass through "0." and lose the dot
        field.fill(text)
    field.press("Tab")


def field(page, selector: str):
    """The input (or textarea) of a Gradio field, for Playwright's waiting assertions."""
    return page.locator(f"{selector} input, {selector} textarea").first


def choose(page, selector: str, option: str) -> None:
    """Pick ``option`` from a Gradio dropdown as a person does."""
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser, space):
    """The Space on the merge form, in a fresh browser page; ``space`` is the served bot of
    the module that uses it."""
    with space_page(browser, space.url) as page:
        page.wait_for_selector("#method input")
        yield page
