"""Every bad input gets one clear sentence naming the thing and the fix, before any heavy work,
and leaves no output folder behind. A table of (recipe, error class, sentence)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import save_file

from merge_engine import load_recipe, merge, preflight
from merge_engine.errors import (
    IncompatibleModelsError,
    MergeError,
    OutputExistsError,
    RecipeError,
    SourceError,
    UnsafeCheckpointError,
)

TWO_TIES = "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.5}}}}, {{model: {b}, parameters: {{weight: 1, density: 0.5}}}}]\n"

CASES = [
    (
        "unknown method",
        "merge_method: tie\nbase_model: {base}\nmodels: [{{model: {a}}}]\n",
        RecipeError,
        "merge_method: unknown merge method 'tie'; did you mean 'ties'?",
    ),
    (
        "unknown parameter",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, densty: 0.5}}}}]\n",
        RecipeError,
        "models[0].parameters.densty: 'densty' is not a parameter of ties; did you mean 'density'?",
    ),
    (
        "missing required parameter",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{density: 0.5}}}}]\n",
        RecipeError,
        "models[0].parameters.weight: ties needs 'weight' for model {a}; set it for that model or in the top-level parameters",
    ),
    (
        "required parameter missing on a tensor no filter names",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: [{{filter: self_attn, value: 1}}]}}}}]\n",
        RecipeError,
        "models[0].parameters.weight: ties needs 'weight' for model {a} on tensor model.embed_tokens.weight, which no filter of 'weight' matches; add an entry without a filter, the value for every tensor the filters leave out",
    ),
    (
        "global required parameter missing",
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\n",
        RecipeError,
        "parameters.t: slerp needs 't'; set it in the top-level parameters",
    ),
    (
        "density above one",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 1.5}}}}]\n",
        RecipeError,
        "models[0].parameters.density: 1.5 is out of range; density must lie in (0, 1] (model {a})",
    ),
    (
        "density zero in a gradient",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\nparameters: {{density: [0.5, 0]}}\n",
        RecipeError,
        "parameters.density: 0 is out of range; density must lie in (0, 1] (model {a}, tensor model.layers.3.",
    ),
    (
        "weights cancel under normalize",
        "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: -1}}}}]\n",
        RecipeError,
        "parameters: the weights sum to zero, so normalize would divide by zero; change a weight or set normalize: false",
    ),
    (
        "global parameter on a model",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, normalize: false}}}}]\n",
        RecipeError,
        "models[0].parameters.normalize: 'normalize' applies to the whole merge, not to one model; move it to the top-level or slice parameters",
    ),
    (
        "base missing",
        "merge_method: ties\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n",
        RecipeError,
        "base_model: ties works on differences from a base model; name it in base_model",
    ),
    (
        "too many models for slerp",
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n",
        RecipeError,
        "models: slerp takes exactly 1 model besides the base, got 2",
    ),
    (
        "models and slices",
        "merge_method: linear\nmodels: [{{model: {a}}}]\nslices: [{{sources: [{{model: {a}, layer_range: [0, 2]}}]}}]\n",
        RecipeError,
        "give exactly one of 'models' (whole models) or 'slices' (layer ranges)",
    ),
    (
        "misspelt field",
        "merge_method: linear\nmodel: [{{model: {a}}}]\n",
        RecipeError,
        "model: is not a recipe field; check its spelling or remove it",
    ),
    (
        "bad dtype",
        "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\ndtype: fp8\n",
        RecipeError,
        "dtype: must be one of float32, float16, bfloat16, float64, got 'fp8'",
    ),
    (
        "layer range outside the model",
        "merge_method: passthrough\nslices: [{{sources: [{{model: {a}, layer_range: [2, 9]}}]}}]\n",
        RecipeError,
        "slices[0].sources[0].layer_range: {a} has 4 layers, so [2, 9) does not fit; the end must be at most 4",
    ),
    (
        "empty layer range",
        "merge_method: passthrough\nslices: [{{sources: [{{model: {a}, layer_range: [3, 3]}}]}}]\n",
        RecipeError,
        "slices[0].sources[0].layer_range: layer_range [3, 3] is empty or negative",
    ),
    (
        "missing folder",
        "merge_method: linear\nmodels: [{{model: {a}-typo, parameters: {{weight: 1}}}}]\n",
        SourceError,
        "model folder {a}-typo does not exist; check the path, or write org/name for a Hub model",
    ),
    (
        "union tokenizer",
        "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\ntokenizer_source: union\n",
        RecipeError,
        "tokenizer_source: 'union' (building a merged vocabulary) is not supported; use 'base' or one of the models",
    ),
    (
        "parameter of the wrong shape",
        "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: {{filter: mlp}}}}}}]\n",
        RecipeError,
        "models[0].parameters.weight: must be a number, true/false, a list of numbers (a gradient), a list of {{filter, value}} entries or {{blocks: [one value per block]}}",
    ),
    (
        "two LoRA adapters on one model",
        "merge_method: linear\nmodels: [{{model: {a}+org/adapter+org/other}}]\n",
        RecipeError,
        "models[0].model: '{a}+org/adapter+org/other' applies more than one adapter ('+' twice); mergebot applies one adapter per model: merge the adapters into one first",
    ),
    (
        "slice without a base for a method that needs one",
        "merge_method: task_arithmetic\nslices:\n  - sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [0, 2]}}]\n    base_model: {base}\n  - sources: [{{model: {a}, layer_range: [2, 4]}}]\nparameters: {{weight: 1}}\n",
        RecipeError,
        "slices[1].base_model: task_arithmetic works on differences from a base model, and this slice names none",
    ),
    (
        "tokenizer with another vocabulary",
        "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\ntokenizer_source: {other_vocab}\n",
        RecipeError,
        "tokenizer_source: {other_vocab} has a vocabulary of 128 tokens but the merged embeddings have 96 rows",
    ),
    (
        "unknown device",
        "merge_method: linear\nmodels: [{{model: {a}}}]\nparameters: {{weight: 1}}\n",
        MergeError,
        "--device gpu is not a device mergebot knows; use auto, cpu, cuda or cuda:N",
    ),
    (
        "invalid yaml",
        "merge_method: linear\nmodels: [{{model: {a}\n",
        RecipeError,
        "the recipe is not valid YAML at line",
    ),
]


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory):
    """A model whose config declares 128 tokens where the others have 96."""
    from merge_engine.example import make_family

    base, _ = make_family(tmp_path_factory.mktemp("vocab"), "llama", finetunes=0, vocab_size=128)
    return base


@pytest.mark.parametrize(("label", "text", "error", "sentence"), CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_gets_one_clear_sentence(
    llama_family, other_vocabulary, tmp_path, label, text, error, sentence
):
    base, (a, b, _) = llama_family
    names = {"base": base, "a": a, "b": b, "other_vocab": other_vocabulary}
    recipe = write_recipe(tmp_path, text.format(**names))
    device = "gpu" if label == "unknown device" else "cpu"
    with pytest.raises(error) as caught:
        merge(preflight(load_recipe(recipe)), tmp_path / "out", show_progress=False, device=device)
    assert str(caught.value).startswith(sentence.format(**names))
    assert not (tmp_path / "out").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    from safetensors.torch import load_file

    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_hub_reference_while_offline_says_what_to_do(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "merge_method: linear\nmodels: [{model: some-org/some-model, parameters: {weight: 1}}]\n",
    )
    run = subprocess.run(
        [sys.executable, "-m", "merge_engine.cli", "validate", str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: some-org/some-model is a Hub model but HF_HUB_OFFLINE is set; unset it, or point the recipe at a local folder"
    )


ODD_MODELS = [
    (
        "extra tensor",
        lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2, 2)},
        r"has 1 tensor\(s\) that .* lacks \(e.g. model.layers.0.mlp.extra.weight\); the models must share one architecture",
    ),
    (
        "missing tensor",
        lambda t: {k: v for k, v in t.items() if k != "model.layers.2.self_attn.k_proj.weight"},
        r"has no tensor model.layers.2.self_attn.k_proj.weight, which the other models have",
    ),
    (
        "other shape",
        lambda t: {**t, "model.layers.1.mlp.up_proj.weight": torch.zeros(65, 32)},
        r"tensor model.layers.1.mlp.up_proj.weight of .*odd has shape \[65, 32\], but \[64, 32\] in",
    ),
    (
        "other vocabulary",
        lambda t: {**t, "model.embed_tokens.weight": torch.zeros(100, 32)},
        r"vocabulary sizes differ: .*odd has 100 tokens in model.embed_tokens.weight, .* has 96",
    ),
]


@pytest.mark.parametrize(("label", "edit", "message"), ODD_MODELS, ids=[c[0] for c in ODD_MODELS])
def test_models_that_do_not_match_are_refused_with_the_tensor_named(
    llama_family, tmp_path, label, edit, message
):
    base, (a, b, _) = llama_family
    odd = _copy(b, tmp_path / "odd")
    _edit_weights(odd, edit)
    recipe = write_recipe(tmp_path, TWO_TIES.format(base=base, a=a, b=odd))
    with pytest.raises(IncompatibleModelsError, match=message):
        preflight(load_recipe(recipe))


def test_pickle_checkpoints_are_refused_unless_allowed(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    pickled = _copy(b, tmp_path / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path, TWO_TIES.format(base=base, a=a, b=pickled))
    with pytest.raises(
        UnsafeCheckpointError, match="has only pickle weights .*pass --allow-pickle"
    ):
        preflight(load_recipe(recipe))
    plan = preflight(load_recipe(recipe), allow_pickle=True)
    assert len(plan.tasks) == 39


def test_output_folder_holding_a_model_is_refused_before_any_work(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    out = _copy(a, tmp_path / "existing")
    before = (out / "model.safetensors").read_bytes()
    recipe = write_recipe(tmp_path, TWO_TIES.format(base=base, a=a, b=b))
    with pytest.raises(
        OutputExistsError,
        match="already exists and is not empty; choose a new folder or delete it first",
    ):
        merge(preflight(load_recipe(recipe)), out, show_progress=False)
    assert (out / "model.safetensors").read_bytes() == before


def test_a_failure_mid_merge_leaves_no_output_folder(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    broken = _copy(b, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(
        data[: len(data) // 2]
    )  # header intact, weights cut short
    recipe = write_recipe(tmp_path, TWO_TIES.format(base=base, a=a, b=broken))
    plan = preflight(load_recipe(recipe))  # headers alone look fine
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error for a truncated file)
        merge(plan, tmp_path / "out", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "recipe.yaml"]


def test_a_base_model_outside_models_is_not_averaged_in(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 1}}\n",
    )
    plan = preflight(load_recipe(recipe))
    assert all(base not in [r.model for r in task.reads()] for task in plan.tasks)
    assert plan.notes == [
        f"linear does not use a base model: {base} only donates config and tokenizer"
    ]


def test_config_donor_is_the_base_else_the_first_model(llama_family, tmp_path):
    base, a, b = (
        _copy(folder, tmp_path / name)
        for folder, name in zip((llama_family[0], *llama_family[1][:2]), "xab", strict=False)
    )
    for folder, marker in ((base, "from-base"), (a, "from-a"), (b, "from-b")):
        config = json.loads((folder / "config.json").read_text())
        config["mergebot_test_marker"] = marker
        (folder / "config.json").write_text(json.dumps(config))
    with_base = write_recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {b}}}, {{model: {a}}}]\nparameters: {{weight: 1}}\n",
    )
    assert preflight(load_recipe(with_base)).config["mergebot_test_marker"] == "from-base"
    without = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels: [{{model: {b}}}, {{model: {a}}}]\nparameters: {{weight: 1}}\n",
    )
    assert preflight(load_recipe(without)).config["mergebot_test_marker"] == "from-b"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 kB filesystem (tmpfs), too small for any merged model."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_too_small_is_refused_before_any_work(llama_family, tiny_disk, tmp_path):
    base, (a, b, _) = llama_family
    recipe = write_recipe(tmp_path, TWO_TIES.format(base=base, a=a, b=b))
    with pytest.raises(
        MergeError, match=r"has 0.1 MB free but the merged weights need 0.\d MB; free some space"
    ):
        merge(preflight(load_recipe(recipe)), tiny_disk / "out", show_progress=False)
    assert list(tiny_disk.iterdir()) == []
