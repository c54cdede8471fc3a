"""The Space's block weights in a real browser: Debian's Chromium driven by Playwright against
``mergebot serve`` with the sandbox hub, which holds two tiny SD1.5 pipelines (the first one
private, so only the signed-in person's token can tell the form what it is). A person types the
two repos, gets a row of per-block weights headed by the 26 block names, merges, and finds the
values in the card's block table; a row one value short is refused by that row, and nothing is
queued. A screenshot of the form goes to ``test-artifacts/screenshots``."""

from __future__ import annotations

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
)
from huggingface_hub import HfApi
from playwright.sync_api import expect
from service_env import BOT_TOKEN

from merge_engine.example_diffusion import make_finetune, make_pipeline
from merge_engine.sources.formats.blocks import block_names
from service.server import MOCK_OAUTH_TOKEN
from service.space.recipe_form import IN_BLOCKS_FROM_A, OUT_BLOCKS_FROM_B

pytestmark = pytest.mark.slow

__all__ = ["browser", "page"]  # the fixtures, used by this module's tests

BLOCKS = block_names("sd1")
VALUES = [f"{0.04 * i:g}" for i in range(len(BLOCKS))]
"""One distinct value per block (0, 0.04, … 1), so the card's table shows their order too."""


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The sandbox hub with a tiny SD1.5 pipeline (private) and a fine-tune of it (public),
    both the demo user's, and the bot serving the Space; the local sign-in is the demo user."""
    folder = tmp_path_factory.mktemp("sd")
    base = make_pipeline(folder / "base", "sd1", seed=0)
    tuned = make_finetune(base, folder / "tuned", seed=1)
    server = demo_hub()
    api = HfApi(endpoint=server.url, token="tok-demo")
    for repo, path, private in (("demo/sd-secret", base, True), ("demo/sd-tuned", tuned, False)):
        api.create_repo(repo, private=private)
        api.upload_folder(repo_id=repo, folder_path=path)
    with serving_space(server, tmp_path_factory.mktemp("space") / "work") as bot:
        yield bot
    server.__exit__()


def jobs_count(space) -> int:
    return len(space.call("GET", "/api/jobs")[1])


def inspections(space, repo: str) -> int:
    """How many times ``repo`` was asked what it is (its model info), by anyone."""
    path = re.compile(rf"^/api/models/{re.escape(repo)}(/revision/[^/]+)?$")
    return sum(1 for r in space.sandbox.hub.requests if path.match(r.path))


def expect_block_rows(page, shown: bool) -> None:
    """Both model rows with a block row headed by SD1.5's 26 block names (and no layer
    range: diffusion models merge whole), or without (language models)."""
    for row in ("#model-0", "#model-1"):
        blocks, layers = page.locator(f"{row}-blocks"), page.locator(f"{row}-layers")
        if not shown:
            expect(blocks).to_be_hidden()
            expect(layers).to_be_visible()
            continue
        expect(blocks).to_be_visible()
        expect(blocks).to_contain_text("weight per block")
        expect(blocks).to_contain_text("26 values, comma-separated, in this order: BASE IN00")
        expect(blocks).to_contain_text(" ".join(BLOCKS))
        expect(layers).to_be_hidden()


def wait_for_yaml(page, pattern: str) -> None:
    """Wait until the form's edits have reached the YAML (Validate reads the YAML)."""
    page.get_by_role("tab", name="YAML").click()
    expect(field(page, "#recipe-yaml")).to_have_value(re.compile(pattern))
    page.get_by_role("tab", name="Form").click()


def fill_in_two_sd_models(page, space) -> None:
    """Sign in, pick a linear merge, and type the two SD1.5 repos (the first example's base
    and third model, language models, cleared); the block rows appear. The first model is
    inspected once, whatever is typed afterwards."""
    page.get_by_role("button", name=re.compile("Sign in")).click()
    expect_text(page, "#who", r"Signed in as demo")
    page.wait_for_selector("#method input")
    choose(page, "#method", "linear")
    expect(page.locator("#model-0-density")).to_be_hidden()  # the form follows the method
    field(page, "#base-model").fill("")  # a linear merge takes no base
    field(page, "#base-model").press("Tab")
    page.locator("#model-2-remove").click()
    expect(page.locator("#model-2-repo")).to_be_hidden()
    expect_block_rows(page, shown=False)
    set_value(page, "#model-0-repo", "demo/sd-secret")
    set_value(page, "#model-1-repo", "demo/sd-tuned")
    set_value(page, "#model-1-weight", "1")
    expect_block_rows(page, shown=True)
    asked = inspections(space, "demo/sd-secret")
    assert asked >= 1
    set_value(page, "#model-0-repo", "demo/math")  # another kind of model, and back
    expect_block_rows(page, shown=False)
    set_value(page, "#model-0-repo", "demo/sd-secret")
    expect_block_rows(page, shown=True)
    assert inspections(space, "demo/sd-secret") == asked  # remembered, not asked again


def test_block_weights_typed_in_the_form_are_merged_and_shown_in_the_card(page, space, tmp_path):
    fill_in_two_sd_models(page, space)
    set_value(page, "#model-0-blocks", ",".join(VALUES))
    set_value(page, "#target", "demo/sd-blocks")
    wait_for_yaml(
        page, r"model: demo/sd-secret\n\s+parameters:\n\s+weight:\n\s+blocks: \[0, 0\.04, "
    )
    page.locator("#validate").click()
    assert "valid: linear" in expect_text(page, "#outcome", "valid")
    expect(field(page, "#model-0-blocks")).to_have_value(",".join(VALUES))  # kept as typed
    shot(page, "diffusion-block-weights")

    page.locator("#merge").click()
    job_id = re.search(r"Job (job-\w+)", expect_text(page, "#outcome", r"Job job-\w+"))[1]
    expect_text(page, "#job-status", r"succeeded|failed", timeout=180_000)
    assert "succeeded" in page.locator("#job-status").inner_text(), page.locator(
        "#job-log textarea"
    ).input_value()

    api = HfApi(endpoint=space.sandbox.url, token="tok-demo")
    card = Path(api.hf_hub_download("demo/sd-blocks", "README.md", cache_dir=tmp_path)).read_text()
    assert job_id in card
    table = card.split("## Block weights", 1)[1].split("\n## ", 1)[0]
    header = re.search(r"^\| block \|(.+)\|$", table, re.M)[1]
    assert "`weight` of demo/sd-secret@" in header and header.count("|") == 0  # one column
    shown = dict(re.findall(r"^\| (BASE|IN\d\d|M00|OUT\d\d) \| ([^|]+?) \|$", table, re.M))
    assert list(shown) == list(BLOCKS)
    assert [shown[name] for name in BLOCKS] == VALUES
    # the private model was read with the person's (demo's) tokens throughout, never the bot's
    tokens = {r.token for r in space.sandbox.hub.requests if "demo/sd-secret" in r.path}
    assert tokens and tokens <= {"tok-demo", MOCK_OAUTH_TOKEN} and BOT_TOKEN not in tokens


def test_a_block_row_one_value_short_is_refused_by_that_row_and_nothing_is_queued(page, space):
    fill_in_two_sd_models(page, space)
    set_value(page, "#model-1-blocks", ",".join(VALUES[:-1]))
    set_value(page, "#target", "demo/sd-never")
    wait_for_yaml(page, r"blocks: \[0, 0\.04, [^\]]*, 0\.92, 0\.96\]")
    before = jobs_count(space)
    page.locator("#validate").click()
    error = expect_text(page, "#error-model-1", "⚠")
    assert "has 25 block values" in error and "needs 26" in error
    assert "BASE, IN00, IN01" in error and "OUT10, OUT11" in error
    assert "under model 2" in expect_text(page, "#outcome", "Not valid")
    assert page.locator("#error-model-0").inner_text().strip() == ""
    # the sentence sits right under that model's block row
    row_box = page.locator("#model-1-blocks").bounding_box()
    error_box = page.locator("#error-model-1").bounding_box()
    assert 0 <= error_box["y"] - (row_box["y"] + row_box["height"]) < 60

    page.locator("#merge").click()
    expect_text(page, "#outcome", "Not submitted")
    assert "has 25 block values" in page.locator("#error-model-1").inner_text()
    assert jobs_count(space) == before


def test_the_block_weighted_example_loads_its_rows_and_validates(page):
    """The examples' SD1.5 merge (the demo hub's tiny pipelines): A's input blocks, B's output
    blocks, one row each."""
    page.get_by_role("button", name=re.compile("Sign in")).click()
    expect_text(page, "#who", r"Signed in as demo")
    choose(page, "#example", "SD1.5 weighted sum per block (MBW)")
    page.locator("#load-example").click()
    expect(field(page, "#model-0-repo")).to_have_value("demo/sd-dreamy")
    expect_block_rows(page, shown=True)
    expect(field(page, "#model-0-blocks")).to_have_value(IN_BLOCKS_FROM_A)
    expect(field(page, "#model-1-blocks")).to_have_value(OUT_BLOCKS_FROM_B)
    page.locator("#validate").click()
    assert "valid: linear" in expect_text(page, "#outcome", "valid")
