"""A recipe is text from strangers: bounded before YAML builds anything, names checked by the
Hub's rules before any Hub call, and no error echoes more than a short excerpt of the input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from merge_engine.errors import RecipeError, excerpt
from merge_engine.recipe.hub_names import check_repo_id, check_revision
from merge_engine.recipe.limits import RecipeLimits
from merge_engine.recipe.schema import load_recipe, parse_recipe, recipe_from_text

ONE_MODEL = "merge_method: linear\nmodels:\n  - model: {model}\n"


def billion_laughs(levels: int = 9) -> str:
    """Inline examples whose text lists the previous one nine times: 9**levels values from a
    few hundred bytes, all inside fields a recipe may hold."""
    examples = ["{text: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]}"]
    for level in range(1, levels):
        examples.append(f"{{text: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]}")
    return "merge_method: linear\nmodels: [{model: org/a}]\ncalibration:\n  examples:\n" + "".join(
        f"    - {example}\n" for example in examples
    )


def test_an_alias_bomb_is_refused_naming_the_limit():
    text = billion_laughs()
    assert len(text) < 1000
    with pytest.raises(RecipeError, match="more than the 50,000 values allowed, counting an alias"):
        recipe_from_text(text)


def test_many_values_without_aliases_count_too():
    text = (
        ONE_MODEL.format(model="org/a") + "parameters: {weight: [" + ", ".join("1" * 200) + "]}\n"
    )
    with pytest.raises(RecipeError, match="more than the 100 values allowed"):
        recipe_from_text(text, RecipeLimits(max_nodes=100))


def test_an_alias_inside_its_own_anchor_is_refused():
    with pytest.raises(RecipeError, match="inside its own anchor"):
        recipe_from_text("merge_method: linear\nmodels: &m [{model: org/a}, *m]\n")


def test_anchors_and_aliases_of_a_normal_recipe_still_load():
    recipe = recipe_from_text(
        "merge_method: ties\n"
        "base_model: org/base\n"
        "models:\n"
        "  - model: org/a\n"
        "    parameters: &p {weight: 0.5, density: 0.5}\n"
        "  - model: org/b\n"
        "    parameters: *p\n"
        "  - model: org/c\n"
        "    parameters: {<<: *p, density: 0.7}\n"
    )
    assert [m.parameters for m in recipe.models] == [
        {"weight": 0.5, "density": 0.5},
        {"weight": 0.5, "density": 0.5},
        {"weight": 0.5, "density": 0.7},
    ]


@pytest.mark.parametrize(
    "text",
    [
        "merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000,
        "merge_method: linear\nmodels:\n" + "".join("  " * i + "- \n" for i in range(1, 200)),
        "merge_method: linear\nparameters: " + "{a: " * 3000 + "1" + "}" * 3000,
    ],
    ids=["flow lists", "block lists", "flow mappings"],
)
def test_deep_nesting_is_refused_without_recursion_error(text):
    with pytest.raises(RecipeError, match="deeper than the 32 levels allowed"):
        recipe_from_text(text)


def test_nesting_through_aliases_counts_too():
    nested = "[" * 20 + "1" + "]" * 20
    text = (
        f"merge_method: linear\na: &a {nested}\nparameters: {{x: [[[[[[[[[[[[[[*a]]]]]]]]]]]]]]}}\n"
    )
    with pytest.raises(RecipeError, match="deeper than the 32 levels allowed"):
        recipe_from_text(text)


def test_a_recipe_over_max_bytes_is_refused():
    text = ONE_MODEL.format(model="org/a") + "# " + "x" * 300_000 + "\n"
    with pytest.raises(RecipeError, match="more than the 262,144 allowed"):
        recipe_from_text(text)
    assert recipe_from_text(text, RecipeLimits(max_bytes=400_000)).merge_method == "linear"


def test_load_recipe_applies_the_limits_to_files(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(ONE_MODEL.format(model="org/a") + "# " + "x" * 2000 + "\n")
    with pytest.raises(RecipeError, match="more than the 1,024 allowed"):
        load_recipe(path, RecipeLimits(max_bytes=1024))


@pytest.mark.parametrize(
    "block, field",
    [
        ("calibration: {{examples: {examples}}}\n", "calibration.examples"),
        (
            "    calibration: {{examples: {examples}}}\n",
            "models[0].calibration.examples",
        ),
    ],
)
def test_too_many_inline_examples_are_refused_with_the_field(block, field):
    text = ONE_MODEL.format(model="org/a") + block.format(examples=["hello"] * 1025)
    with pytest.raises(RecipeError, match="more than the 1,024 allowed") as error:
        recipe_from_text(text)
    assert error.value.field == field
    recipe_from_text(ONE_MODEL.format(model="org/a") + block.format(examples=["hello"] * 1024))


def test_a_too_long_inline_example_is_refused_with_the_field():
    examples = ["short", "x" * 8193]
    text = ONE_MODEL.format(model="org/a") + f"calibration: {{examples: {examples}}}\n"
    with pytest.raises(RecipeError, match="more than the 8,192 allowed") as error:
        recipe_from_text(text)
    assert error.value.field == "calibration.examples[1]"
    assert len(str(error.value)) < 300


def test_a_dict_example_is_measured_too():
    text = ONE_MODEL.format(model="org/a") + "calibration: {examples: [{text: " + "y" * 50 + "}]}\n"
    with pytest.raises(RecipeError) as error:
        recipe_from_text(text, RecipeLimits(max_example_chars=40))
    assert error.value.field == "calibration.examples[0]"


def test_an_over_long_model_name_is_a_recipe_error_not_an_os_error():
    with pytest.raises(RecipeError, match="more than the 256 allowed") as error:
        recipe_from_text(ONE_MODEL.format(model="a" * 5000))
    assert error.value.field == "models[0].model"
    with pytest.raises(RecipeError, match="not a name the Hub accepts"):
        recipe_from_text(ONE_MODEL.format(model="org/" + "a" * 5000))


def test_an_over_long_parameter_name_is_refused():
    text = ONE_MODEL.format(model="org/a") + "parameters: {" + "w" * 300 + ": 1}\n"
    with pytest.raises(RecipeError, match="more than the 256 allowed") as error:
        recipe_from_text(text)
    assert len(str(error.value)) < 300


HUB_RULES = (
    "is not a name the Hub accepts as namespace/name (letters, digits, '-', '_' and '.', "
    "no '--' or '..', not starting or ending with '-' or '.', at most 96 characters per part, "
    "not ending in '.git'); fix the name"
)


@pytest.mark.parametrize(
    "name",
    ["alice/modèle", "alice/x.", "alice/a--b", "x.git", "alice/x.git", "alice/x\n", "org/..",
     "alice", "a/b/c", "-org/a", "org/" + "a" * 97, ""],
)  # fmt: skip
def test_names_the_hub_refuses_get_one_sentence(name):
    with pytest.raises(RecipeError) as error:
        check_repo_id(name, "model", "models[0].model")
    assert str(error.value) == f"models[0].model: model {excerpt(name)} {HUB_RULES}"


@pytest.mark.parametrize(
    "name", ["alice/model", "Org-1/my_model.v2", "gpt2/gpt2", "a/" + "b" * 96, "1/2"]
)
def test_names_the_hub_accepts_pass(name):
    check_repo_id(name, "model", None)


@pytest.mark.parametrize(
    "revision",
    ["..", "a..b", "x@{1}", "-x", "/x", "x/", "x.", "x.lock", "a//b", "a b", "a~1", "a^", "a:b",
     "a?", "a*", "a[", "a\\b", "", "x" * 256, "main\n", "a\x7fb"],
)  # fmt: skip
def test_revisions_git_refuses_get_one_sentence(revision):
    with pytest.raises(RecipeError, match=r"is not a branch, tag or commit name git accepts") as e:
        check_revision(revision, "models[0].model")
    assert str(e.value).startswith(f"models[0].model: revision {excerpt(revision)} ")
    assert str(e.value).endswith("; fix the revision")


@pytest.mark.parametrize(
    "revision",
    ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567", "feature/x-y_z"],
)
def test_valid_revisions_pass(revision):
    check_revision(revision, None)


@pytest.mark.parametrize(
    "model, sentence",
    [
        ("alice/modèle", "model 'alice/modèle' is not a name the Hub accepts"),
        ("alice/a--b", "model 'alice/a--b' is not a name the Hub accepts"),
        ("org/name@..", "revision '..' is not a branch, tag or commit name git accepts"),
        ("org/name@main", None),
        ("org/name@refs/pr/1", None),
    ],
)
def test_model_references_are_checked_before_any_hub_call(model, sentence):
    if sentence is None:
        recipe_from_text(ONE_MODEL.format(model=model))
        return
    with pytest.raises(RecipeError, match=sentence) as error:
        recipe_from_text(ONE_MODEL.format(model=model))
    assert error.value.field == "models[0].model"


@pytest.mark.parametrize(
    "dataset, sentence",
    [
        ("org/..", "dataset 'org/..' is not a name the Hub accepts"),
        ("org/a--b", "dataset 'org/a--b' is not a name the Hub accepts"),
        ("org/data@a..b", "revision 'a..b' is not a branch"),
    ],
)
def test_dataset_references_follow_the_hub_rules(dataset, sentence):
    text = ONE_MODEL.format(model="org/a") + f"calibration: {{dataset: '{dataset}'}}\n"
    with pytest.raises(RecipeError, match=sentence) as error:
        recipe_from_text(text)
    assert error.value.field == "calibration.dataset"


def test_local_folders_keep_working(tmp_path):
    folder = tmp_path / "models" / "a"
    folder.mkdir(parents=True)
    recipe = recipe_from_text(ONE_MODEL.format(model=folder))
    assert recipe.models[0].model.is_local
    for missing in ("./models/nope", "/tmp/no/such/folder"):
        assert recipe_from_text(ONE_MODEL.format(model=missing)).models[0].model.is_local


HUGE = "z" * 1_000_000


@pytest.mark.parametrize(
    "data",
    [
        {"merge_method": "linear", "models": [{"model": "org/a"}], "dtype": HUGE},
        {"merge_method": "linear", "models": [{"model": "org/" + HUGE}]},
        {"merge_method": "linear", "models": [{"model": HUGE + "+org/adapter+org/other"}]},
        {
            "merge_method": "linear",
            "models": [{"model": "org/a"}],
            "calibration": {"dataset": HUGE},
        },
        {"merge_method": "linear", "models": [{"model": "org/a"}], "calibration": {"path": HUGE}},
        {"merge_method": "linear", "models": [{"model": "org/a"}], HUGE: 1},
        {"merge_method": "linear", "models": [{"model": "org/a@" + HUGE}]},
    ],
    ids=["dtype", "hub name", "lora", "dataset", "calibration path", "field name", "revision"],
)
def test_a_huge_value_is_echoed_only_as_an_excerpt(data):
    with pytest.raises(RecipeError) as error:
        parse_recipe(data)
    assert len(str(error.value)) < 400
    assert "1,000" in str(error.value)  # the excerpt says how long the value was


def test_a_huge_value_in_recipe_text_is_echoed_only_as_an_excerpt():
    text = f"merge_method: linear\nmodels: [{{model: org/a}}]\ndtype: {HUGE}\n"
    with pytest.raises(RecipeError) as error:
        recipe_from_text(text, RecipeLimits(max_bytes=2**21))
    assert len(str(error.value)) < 300


def test_yaml_errors_still_name_line_and_column():
    with pytest.raises(RecipeError, match="not valid YAML at line 2, column 10: mapping values"):
        recipe_from_text("merge_method: linear\nmodels: x: y\n")


def test_a_number_yaml_cannot_read_is_a_recipe_error():
    with pytest.raises(RecipeError, match="number or date YAML cannot read"):
        recipe_from_text(ONE_MODEL.format(model="org/a") + "random_seed: " + "9" * 5000 + "\n")


@pytest.mark.parametrize(
    "text, sentence",
    [
        (
            "merge_method: linear\nmodels: " + "[" * 3000 + "]" * 3000 + "\n",
            "deeper than the 32 levels allowed",
        ),
        (ONE_MODEL.format(model="alice/modèle"), "not a name the Hub accepts"),
        (ONE_MODEL.format(model="org/name@.."), "is not a branch, tag or commit name"),
        (ONE_MODEL.format(model="a" * 5000), "more than the 256 allowed"),
        (billion_laughs(), "more than the 50,000 values allowed, counting an alias"),
    ],
    ids=["deep", "hub name", "revision", "long name", "alias bomb"],
)
def test_mergebot_validate_prints_one_sentence_and_exits_1(tmp_path, text, sentence):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    lines = (run.stderr + run.stdout).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert sentence in lines[0] and len(lines[0]) < 400


@pytest.mark.parametrize(
    ("patterns", "field", "words"),
    [
        (["^a"] * 4, "discard", "has 4 patterns, more than the 3 allowed; join patterns with |"),
        (["a" * 41], "discard[0]", "is 41 characters long, more than the 40 allowed"),
        (["x", "(?<!vae)\\.weight"], "discard[1]", "uses lookaround"),
        (["(a)\\1"], "discard[0]", "uses a backreference (\\1 or (?P=name))"),
        (["(?P<n>a)(?P=n)"], "discard[0]", "uses a backreference"),
        (["vae\\Z"], "discard[0]", "uses \\Z, which patterns write as $"),
        (["[vae"], "discard[0]", "is not a regular expression ('missing ]: [vae')"),
        (["a{1000}{1000}"], "discard[0]", "is not a regular expression"),
        (["x|"], "discard[0]", "matches an empty name, so it matches every tensor name"),
    ],
)
def test_discard_patterns_are_bounded_and_run_in_linear_time(patterns, field, words):
    limits = RecipeLimits(max_patterns=3, max_pattern_chars=40)
    text = ONE_MODEL.format(model="org/a") + f"discard: {json.dumps(patterns)}\n"
    with pytest.raises(RecipeError) as error:
        recipe_from_text(text, limits)
    assert error.value.field == field and words in str(error.value)


def test_a_discard_pattern_matches_anywhere_in_a_name_as_re_search_does():
    from merge_engine.recipe.patterns import NameFilter

    discarded = NameFilter([r"\.ln_final\.", r"^first_stage_model\.", r"([\w.]+)+!"])
    names = ["cond.ln_final.weight", "first_stage_model.x", "model.first_stage_model.x", "a" * 500]
    assert [discarded(n) for n in names] == [True, True, False, False]
