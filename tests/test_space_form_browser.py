"""The merge form as a person edits it, in a real browser (Debian's Chromium driven by
Playwright against ``mergebot serve`` with the demo hub): an error leaves once its field is
changed and names no tensor when the value is the model's; a change of method through one
without per-model weights keeps them; an SD model's block row stands for its weight, and its
Remove button comes after it; a row's LoRA adapter joins its model as ``base+adapter``."""

from __future__ import annotations

import re

import pytest
from browser_env import (
    browser,
    choose,
    demo_space,
    expect_text,
    field,
    page,
    set_value,
    shot,
)
from playwright.sync_api import expect
from service_env import ties_recipe

pytestmark = pytest.mark.slow

__all__ = ["browser", "demo_space", "page"]  # the fixtures, used by this module's tests

NO_WEIGHT = (
    "ties needs 'weight' for model demo/math; set it for that model or in the top-level parameters"
)


@pytest.fixture(scope="module")
def space(demo_space):
    return demo_space


def yaml_value(page):
    """The YAML box's field, read on its tab, for waiting until a form edit has reached it."""
    page.get_by_role("tab", name="YAML").click()
    return field(page, "#recipe-yaml")


def back_to_form(page) -> None:
    page.get_by_role("tab", name="Form").click()


def test_an_error_leaves_when_its_field_changes_and_names_no_tensor(page, space):
    """The first example (TIES) with model 1's weight emptied: the sentence names the model
    and the parameter, as the API's does; it stays while another model changes, and leaves,
    with the line pointing at it, once the weight is typed."""
    set_value(page, "#model-0-weight", "")
    expect(yaml_value(page)).to_have_value(
        re.compile(r"model: demo/math\n\s+parameters: \{density")
    )
    back_to_form(page)
    page.locator("#validate").click()
    shown = expect_text(page, "#error-model-0", "⚠")
    assert NO_WEIGHT in shown and "tensor" not in shown
    expect(page.locator("#outcome")).to_have_text("Not valid: see the ⚠ under model 1.")
    # the JSON API gives the same sentence, the field it names beside it
    status, refusal = space.submit(
        ties_recipe("demo").replace("weight: 1.0, ", ""), "demo/x", "tok-demo"
    )
    assert status == 400 and refusal["error"].endswith(NO_WEIGHT), refusal
    assert refusal["field"] == "models[0].parameters.weight"

    set_value(page, "#model-1-density", "0.4")  # another model's field: the error stays
    expect(yaml_value(page)).to_have_value(re.compile(r"density: 0\.4"))
    back_to_form(page)
    assert NO_WEIGHT in page.locator("#error-model-0").inner_text()

    set_value(page, "#model-0-weight", "1")
    expect(page.locator("#error-model-0")).to_have_text("")
    expect(page.locator("#outcome")).to_have_text("")
    page.locator("#validate").click()
    expect_text(page, "#outcome", "✓ valid: ties")

    set_value(page, "#target", "demo/bad name")  # the target's own box, the same way
    page.locator("#validate").click()
    expect_text(page, "#error-target", "⚠")
    set_value(page, "#target", "demo/good-name")
    expect(page.locator("#error-target")).to_have_text("")
    expect(page.locator("#outcome")).to_have_text("")


def test_a_method_without_weights_between_two_with_them_keeps_them(page):
    """ties → slerp → dare_ties: slerp shows no per-model weight, density or int8_mask; the
    values typed under ties come back under dare_ties, and it validates."""
    page.locator("#param-int8_mask input").check()  # TIES's default is false
    expect(yaml_value(page)).to_have_value(re.compile("int8_mask: true"))
    back_to_form(page)
    choose(page, "#method", "slerp")
    expect(page.locator("#model-0-weight")).to_be_hidden()
    expect(page.locator("#param-int8_mask")).to_be_hidden()
    choose(page, "#method", "dare_ties")
    for row, weight in enumerate(("1", "0.7", "0.5")):
        expect(field(page, f"#model-{row}-weight")).to_have_value(re.compile(rf"^{weight}(\.0)?$"))
        expect(field(page, f"#model-{row}-density")).to_have_value("0.5")
    expect(page.locator("#param-int8_mask input")).to_be_checked()
    page.locator("#validate").click()
    expect_text(page, "#outcome", "✓ valid: dare_ties")


def test_a_rows_lora_adapter_reaches_the_yaml_and_validates_pinned(page):
    """The first example with model 1 as the base and the demo's adapter in its LoRA field:
    the YAML names ``base+adapter``, Validate pins both repos, and the YAML read back fills
    the row's fields again."""
    set_value(page, "#model-0-repo", "demo/base")
    set_value(page, "#model-0-adapter", "demo/math-lora")
    expect(yaml_value(page)).to_have_value(re.compile(r"model: demo/base\+demo/math-lora\n"))
    back_to_form(page)
    page.locator("#validate").click()
    shown = expect_text(page, "#outcome", "✓ valid: ties")
    assert re.search(r"demo/base@[0-9a-f]{8}", shown) and re.search(
        r"demo/math-lora@[0-9a-f]{8}", shown
    ), shown
    set_value(page, "#model-0-adapter", "")
    expect(yaml_value(page)).to_have_value(re.compile(r"model: demo/base\n"))


def test_an_sd_models_weight_is_optional_beside_its_block_row_and_remove_comes_after(page):
    """The block-weighted example: the weight's help says the block row replaces it (the
    example leaves the weights empty), and each model's Remove sits below its block row."""
    choose(page, "#example", "SD1.5 weighted sum per block (MBW)")
    page.locator("#load-example").click()
    for row in ("#model-0", "#model-1"):
        # headed by SD1.5's block names alone once the models' family is known (SDXL's too
        # before): the layout has settled
        blocks = page.locator(f"{row}-blocks")
        expect(blocks).to_contain_text("26 values, comma-separated")
        expect(blocks).not_to_contain_text("SDXL")
        weight = page.locator(f"{row}-weight")
        expect(weight).to_contain_text("required unless the 'weight per block' row below")
        expect(field(page, f"{row}-weight")).to_have_value("")
        # both measured in one frame: Remove's top at or below the block row's bottom
        gap = page.evaluate(
            """row => document.querySelector(row + '-remove').getBoundingClientRect().top
                    - document.querySelector(row + '-blocks').getBoundingClientRect().bottom""",
            row,
        )
        assert gap >= 0, gap
    shot(page, "sd-block-rows")
    page.locator("#validate").click()
    expect_text(page, "#outcome", "✓ valid: linear")
