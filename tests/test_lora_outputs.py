"""Adapters combined into an adapter (``output: adapter``): every PEFT combination type gives
exactly PEFT's own ``add_weighted_adapter`` on the same saved adapters, through the engine's
pre-flight and merge and through ``mergebot merge``; the folder loads with
``PeftModel.from_pretrained``; bad inputs are refused in one sentence with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from test_sources_hub import mergebot
from transformers import AutoModelForCausalLM

from merge_engine import merge, preflight
from merge_engine.cli import main
from merge_engine.errors import IncompatibleModelsError, MergeError, RecipeError
from merge_engine.example import save_model, tiny_config
from merge_engine.methods.adapter_combination import (
    COMBINATION_TYPES,
    DENSITY_TYPES,
    SIGN_TYPES,
    SVD_TYPES,
)
from merge_engine.recipe.schema import recipe_from_text
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

WEIGHTS = (0.7, -0.4)
SEED = 1234
TOKENS = torch.tensor([[1, 5, 9, 2, 33, 70]])

ADAPTERS = {
    # different targets (q_proj in all, v_proj and the embedding in one, down_proj and o_proj
    # in others), plain and rsLoRA scales, another rank with a rank and alpha pattern: every
    # case of PEFT's loop
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "b": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "c": LoraConfig(
        r=2,
        lora_alpha=2,
        target_modules=["q_proj", "o_proj"],
        rank_pattern={"layers.1.self_attn.o_proj": 3},
        alpha_pattern={"layers.1.self_attn.o_proj": 5},
    ),
}


def _base() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama base and three PEFT LoRA adapters of it with random non-zero B's, saved."""
    root = tmp_path_factory.mktemp("adapters")
    base_dir = save_model(_base(), root / "base")
    folders = {}
    for index, (name, config) in enumerate(ADAPTERS.items()):
        model = get_peft_model(_base(), config)
        generator = torch.Generator().manual_seed(index + 1)
        for key, parameter in model.named_parameters():
            if "lora_" in key:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
        model.save_pretrained(root / name)
        folders[name] = root / name
    return base_dir, folders


def peft_combined(
    base: Path, folders: list[Path], combination_type: str, weights=WEIGHTS, **kwargs
) -> PeftModel:
    """PEFT's own combination of the saved adapters, active as adapter ``combined``."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folders[0], "s0")
    for index, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, f"s{index}")
    torch.manual_seed(SEED)
    model.add_weighted_adapter(
        [f"s{i}" for i in range(len(folders))],
        list(weights),
        "combined",
        combination_type=combination_type,
        **kwargs,
    )
    model.set_adapter("combined")
    return model


def recipe_text(base: Path, folders: list[Path], combination_type: str, weights=WEIGHTS, **shared):
    models = "\n".join(
        f"  - model: {folder}\n    parameters: {{weight: {weight}}}"
        for folder, weight in zip(folders, weights, strict=True)
    )
    parameters = f"parameters: {json.dumps(shared)}\n" if shared else ""
    return (
        f"output: adapter\nmerge_method: {combination_type}\nbase_model: {base}\n"
        f"random_seed: {SEED}\nmodels:\n{models}\n{parameters}"
    )


def arguments(combination_type: str) -> dict:
    """PEFT's arguments for a type: a density where it prunes, either sign method where it
    elects signs, a rank where it cuts by SVD, with a clamp or reduced matrices for some."""
    kwargs = {}
    if combination_type in DENSITY_TYPES:
        kwargs["density"] = 0.6
    if combination_type in SIGN_TYPES:
        frequency = combination_type in ("ties", "dare_ties_svd")
        kwargs["majority_sign_method"] = "frequency" if frequency else "total"
    if combination_type in SVD_TYPES:
        kwargs["svd_rank"] = 3
    if combination_type in ("svd", "ties_svd", "dare_ties_svd"):
        kwargs["svd_clamp"] = 0.95
    if combination_type in ("dare_linear_svd", "magnitude_prune_svd"):
        kwargs["svd_full_matrices"] = False
    return kwargs


def logits(base: Path, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        return model(TOKENS).logits


def assert_same_adapter(out: Path, reference: PeftModel, base: Path) -> None:
    """The written factors are PEFT's combined adapter's, bit for bit, and the folder loads
    with PeftModel.from_pretrained and gives the logits of PEFT's combined adapter saved and
    loaded the same way."""
    saved = get_peft_model_state_dict(reference, adapter_name="combined")
    expected = {key: tensor for key, tensor in saved.items() if ".lora_" in key}
    written = load_file(out / "adapter_model.safetensors")
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    peft_dir = out.parent / "peft"
    reference.save_pretrained(peft_dir, selected_adapters=["combined"])
    assert torch.equal(logits(base, out), logits(base, peft_dir / "combined"))


@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_each_combination_type_equals_peft_add_weighted_adapter(
    adapters, tmp_path, combination_type, one_thread
):
    base, folders = adapters
    sources = [folders["a"], folders["b"]]
    kwargs = arguments(combination_type)
    recipe = recipe_from_text(recipe_text(base, sources, combination_type, **kwargs))
    out = merge(preflight(recipe), tmp_path / "combined", show_progress=False)
    assert_same_adapter(out, peft_combined(base, sources, combination_type, **kwargs), base)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd", "dare_linear_svd"])
def test_adapters_of_different_ranks_combine_as_peft_does(
    adapters, tmp_path, combination_type, one_thread
):
    """Three adapters, ranks 4, 4 and 2 with a rank-3 module: cat stacks them to rank 11 (a
    module fewer adapters target keeps zeros at the end), the svd types cut to the rank."""
    base, folders = adapters
    sources = [folders["a"], folders["b"], folders["c"]]
    weights = (0.7, -0.4, 1.5)
    kwargs = arguments(combination_type)
    recipe = recipe_from_text(recipe_text(base, sources, combination_type, weights, **kwargs))
    plan = preflight(recipe)
    assert plan.rank == (11 if combination_type == "cat" else 3)
    out = merge(plan, tmp_path / "combined", show_progress=False)
    reference = peft_combined(base, sources, combination_type, weights, **kwargs)
    assert_same_adapter(out, reference, base)


def test_mergebot_merge_writes_a_peft_adapter_with_its_card(adapters, tmp_path, capsys):
    """``mergebot merge`` on an adapter recipe: PEFT's dare_ties_svd for the same seed, and a
    card that names the combination, the weights and the base."""
    base, folders = adapters
    sources = [folders["a"], folders["b"]]
    kwargs = arguments("dare_ties_svd")
    recipe = write_recipe(tmp_path, recipe_text(base, sources, "dare_ties_svd", **kwargs))
    out = tmp_path / "adapter"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert "combined 2 adapters into" in capsys.readouterr().out
    assert_same_adapter(out, peft_combined(base, sources, "dare_ties_svd", **kwargs), base)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "mergebot_recipe.yaml",
    ]
    card = (out / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert "library_name: peft" in front and "dare_ties_svd" in front
    assert 'combination_type="dare_ties_svd"' in body
    assert "rank 3" in body and "| `density` | 0.6 |" in body
    assert f"| `random_seed` | {SEED} " in body
    assert "| 0.7 |" in body and "| -0.4 |" in body  # each adapter's weight
    assert f"Base model: `{base}`" in body
    # the recipe written beside it makes the same adapter again
    again = tmp_path / "again"
    assert main(["merge", str(out / "mergebot_recipe.yaml"), str(again), "--quiet"]) == 0
    first, second = (load_file(f / "adapter_model.safetensors") for f in (out, again))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapters mergebot refuses to combine: one of a wider base, a DoRA, one with a module
    trained whole, and a full model where an adapter belongs."""
    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=48))
    get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(root / "wide")
    dora = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(_base(), dora).save_pretrained(root / "dora")
    whole = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    get_peft_model(_base(), whole).save_pretrained(root / "whole")
    return {
        "wide": root / "wide",
        "dora": root / "dora",
        "whole": root / "whole",
        "model": save_model(_base(), root / "model"),
    }


def refusal(base, sources, kind="svd", weights=None, **shared) -> MergeError:
    text = recipe_text(base, sources, kind, weights or WEIGHTS[: len(sources)], **shared)
    with pytest.raises(MergeError) as caught:
        preflight(recipe_from_text(text))
    return caught.value


def test_bad_adapters_are_refused_in_one_sentence(adapters, odd_adapters):
    base, folders = adapters
    wide = refusal(base, [folders["a"], odd_adapters["wide"]])
    assert isinstance(wide, IncompatibleModelsError)
    assert "q_proj with an update of shape (48, 48)" in str(wide)
    assert "apply it to the model it was trained on" in str(wide)
    assert "DoRA (use_dora: true)" in str(refusal(base, [folders["a"], odd_adapters["dora"]]))
    whole = refusal(base, [folders["a"], odd_adapters["whole"]])
    assert str(whole).startswith("models[1].model: adapter ") and "lm_head.weight whole" in str(
        whole
    )
    assert "is not a PEFT adapter" in str(refusal(base, [odd_adapters["model"], folders["a"]]))


@pytest.mark.parametrize(
    ("kind", "shared", "field", "says"),
    [
        ("slerp", {}, "merge_method", "is not one of PEFT's combination types"),
        ("linear", {"density": 0.5}, "parameters.density", "linear does not read density"),
        ("ties", {}, "parameters.density", "prunes each adapter to a density"),
        ("ties", {"density": 0}, "parameters.density", "above 0 and at most 1, got 0"),
        ("dare_linear", {"density": 1.5}, "parameters.density", "at most 1, got 1.5"),
        (
            "ties",
            {"density": 0.5, "majority_sign_method": "sum"},
            "parameters.majority_sign_method",
            "total, frequency",
        ),
        ("svd", {"svd_rank": 0}, "parameters.svd_rank", "at least 1"),
        (
            "svd",
            {"svd_rank": 33},
            "parameters.svd_rank",
            "embed_tokens (32 × 96) can hold (rank 32)",
        ),
        ("svd", {"svd_clamp": 2}, "parameters.svd_clamp", "at most 1"),
        ("svd", {"svd_full_matrices": "yes"}, "parameters.svd_full_matrices", "true or false"),
        ("svd", {"svd_driver": "gesvdj"}, "parameters.svd_driver", "only on CUDA"),
        ("cat", {"weight": 1}, "parameters.weight", "one weight per adapter"),
        ("cat", {"epsilon": 1}, "parameters.'epsilon'", "is not a parameter of an adapter output"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(adapters, kind, shared, field, says):
    base, folders = adapters
    error = refusal(base, [folders["a"], folders["b"]], kind, **shared)
    assert isinstance(error, RecipeError) and error.field == field
    assert says in str(error) and str(error).count(". ") == 0


def test_unequal_ranks_are_refused_for_the_factor_types(adapters):
    base, folders = adapters
    error = refusal(base, [folders["a"], folders["c"]], "ties", density=0.5)
    assert error.field == "merge_method"
    assert "rank 4" in str(error) and "rank 2/3" in str(error) and "use cat, svd" in str(error)


def test_a_refused_recipe_writes_nothing(adapters, tmp_path, capsys):
    base, folders = adapters
    text = recipe_text(base, [folders["a"], folders["b"]], "svd", svd_rank=64)
    recipe = write_recipe(tmp_path, text)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 1
    assert "svd_rank 64 is more than" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
    # fields that shape a merged model mean nothing for an adapter, and the base is needed
    calibration = ("calibration: {examples: [hi]}\n", "calibration")
    for extra, field in (
        ("dtype: float16\n", "dtype"),
        ("base_model: null\n", "base_model"),
        calibration,
    ):
        with pytest.raises(RecipeError) as caught:
            preflight(recipe_from_text(text + extra))
        assert caught.value.field == field
    per_model = text.replace("parameters: {weight: 0.7}", "calibration: {examples: [hi]}")
    with pytest.raises(RecipeError) as caught:
        preflight(recipe_from_text(per_model))
    assert caught.value.field == "models[0].calibration"


@pytest.mark.slow  # mergebot in a subprocess against the sandbox hub
def test_hub_adapters_are_read_by_header_pinned_and_combined(adapters, tmp_path):
    """Adapters and base on the (sandbox) Hub: the pre-flight reads headers only and pins
    every repo; the merge downloads the adapters' two files and no weight of the base, and
    gives PEFT's combination, with the pinned commits in the recipe and the card."""
    base, folders = adapters
    token = "hf_sandbox_alice"
    with SandboxServer(SandboxHub(HubStore(), users={token: "alice"})) as server:
        api = HfApi(endpoint=server.url, token=token)
        shas = {}
        for name, folder in (("base", base), ("a", folders["a"]), ("b", folders["b"])):
            api.create_repo(f"alice/{name}")
            # PEFT's own README names no base (the adapters were made from a config), which
            # the Hub's card check refuses
            shas[name] = api.upload_folder(
                repo_id=f"alice/{name}", folder_path=folder, ignore_patterns=["README.md"]
            ).oid
        kwargs = arguments("dare_linear")
        text = recipe_text("alice/base", ["alice/a", "alice/b"], "dare_linear", **kwargs)
        recipe = write_recipe(tmp_path, text)
        before = len(server.hub.requests)
        run = mergebot(server, tmp_path, "validate", str(recipe))
        assert run.returncode == 0, run.stderr
        assert "ok: dare_linear of 2 LoRA adapters of alice/base" in run.stdout
        assert all(f"{sha}" in run.stdout for sha in shas.values())
        reads = [
            r
            for r in server.hub.requests[before:]
            if r.method == "GET" and r.path.endswith(".safetensors")
        ]
        assert reads and all(r.range and r.range.startswith("bytes=0-") for r in reads)

        before = len(server.hub.requests)
        out = tmp_path / "adapter"
        run = mergebot(server, tmp_path, "merge", str(recipe), str(out), "--quiet")
        assert run.returncode == 0, run.stderr
        fetched = [
            r.path.split("/resolve/")[0] + ":" + r.path.rsplit("/", 1)[-1]
            for r in server.hub.requests[before:]
            if r.method == "GET" and "/resolve/" in r.path and not r.range
        ]
        weights = sorted(f for f in fetched if f.endswith(".safetensors"))
        assert weights == [
            "/alice/a:adapter_model.safetensors",
            "/alice/b:adapter_model.safetensors",
        ]
        pinned = (out / "mergebot_recipe.yaml").read_text()
        card = (out / "README.md").read_text()
        for name, sha in shas.items():
            assert f"alice/{name}@{sha}" in pinned and f"`{sha}`" in card
        assert "base_model: alice/base" in card
    reference = peft_combined(base, [folders["a"], folders["b"]], "dare_linear", **kwargs)
    assert_same_adapter(out, reference, base)


@pytest.mark.parametrize("combination_type", ["dare_ties_svd", "dare_linear", "cat"])
def test_gpt2_conv1d_adapters_combine_as_peft_does(tmp_path, combination_type, one_thread):
    """GPT-2 stores its projections (in, out) (``Conv1D``, PEFT's ``fan_in_fan_out``): the
    deltas are transposed where PEFT transposes them, and the random masks drawn on the same
    layouts."""

    def gpt2():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("gpt2"))

    base = save_model(gpt2(), tmp_path / "base")
    folders = []
    for index, targets in enumerate((["c_attn", "c_fc"], ["c_attn", "c_proj"])):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True)
        model = get_peft_model(gpt2(), config)
        generator = torch.Generator().manual_seed(index + 7)
        for key, parameter in model.named_parameters():
            if "lora_" in key:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
        model.save_pretrained(tmp_path / f"adapter{index}")
        folders.append(tmp_path / f"adapter{index}")
    kwargs = arguments(combination_type)
    recipe = recipe_from_text(recipe_text(base, folders, combination_type, **kwargs))
    out = merge(preflight(recipe), tmp_path / "combined", show_progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_same_adapter(out, peft_combined(base, folders, combination_type, **kwargs), base)


def test_modules_are_read_combined_and_written_one_at_a_time(adapters, tmp_path, monkeypatch):
    """Streaming: between two modules' writes, only the next module's factors are read, so
    memory holds one module's factors (and the base's weights are never read)."""
    from merge_engine.output.peft_adapter import PeftAdapterWriter
    from merge_engine.sources.tensors import SafetensorsStore

    events: list[tuple[str, str]] = []
    get, write_module = SafetensorsStore.get, PeftAdapterWriter.write_module

    def spy_get(store, name):
        events.append(("read", name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]))
        return get(store, name)

    def spy_write(writer, module, up, down):
        events.append(("write", module.name))
        return write_module(writer, module, up, down)

    monkeypatch.setattr(SafetensorsStore, "get", spy_get)
    monkeypatch.setattr(PeftAdapterWriter, "write_module", spy_write)
    base, folders = adapters
    recipe = recipe_from_text(recipe_text(base, [folders["a"], folders["b"]], "cat"))
    plan = preflight(recipe)
    assert [str(ref) for ref in plan.sources] == [str(folders["a"]), str(folders["b"])]
    assert not plan.random and plan.seed is None and plan.revisions() == {}
    reported = []
    merge(
        plan,
        tmp_path / "combined",
        show_progress=False,
        progress=lambda done, total, name: reported.append((done, total, name)),
    )
    from merge_engine.run.adapter_merge import output_adapter

    written = [module for event, module in events if event == "write"]
    assert written == [m.name for m in output_adapter(plan).write_order()] and len(written) == 13
    assert reported == [(i + 1, 13, module) for i, module in enumerate(written)]
    since_write: set[str] = set()
    for event, module in events:
        if event == "read":
            since_write.add(module)
        else:
            assert since_write == {module}
            since_write = set()


@pytest.mark.parametrize("combination_type", ["ties", "dare_linear_svd"])
def test_half_precision_adapters_combine_in_float32_as_peft_loads_them(
    adapters, tmp_path, combination_type, one_thread
):
    """PEFT loads bfloat16 and float16 adapters in float32 (``autocast_adapter_dtype``) and
    combines them there; so does mergebot, and writes float32."""
    import shutil

    from safetensors.torch import save_file

    base, folders = adapters
    sources = []
    for name, dtype in (("a", torch.bfloat16), ("b", torch.float16)):
        folder = shutil.copytree(folders[name], tmp_path / name)
        tensors = load_file(folder / "adapter_model.safetensors")
        half = {k: v.to(dtype) if ".lora_" in k else v for k, v in tensors.items()}
        save_file(half, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        sources.append(folder)
    kwargs = arguments(combination_type)
    recipe = recipe_from_text(recipe_text(base, sources, combination_type, **kwargs))
    out = merge(preflight(recipe), tmp_path / "combined", show_progress=False)
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {
        torch.float32
    }
    assert_same_adapter(out, peft_combined(base, sources, combination_type, **kwargs), base)


def test_one_adapter_is_combined_linearly_as_peft_does(adapters, tmp_path, one_thread):
    """PEFT combines a single adapter linearly whatever the type asked; so does mergebot, and
    the card says so."""
    base, folders = adapters
    text = recipe_text(base, [folders["b"]], "ties", weights=(0.5,), density=0.5)
    plan = preflight(recipe_from_text(text))
    assert plan.combination.type == "linear" and "one adapter: PEFT combines" in plan.notes[0]
    out = merge(plan, tmp_path / "combined", show_progress=False)
    assert "one adapter: PEFT combines" in (out / "README.md").read_text()
    reference = peft_combined(base, [folders["b"]], "ties", weights=(0.5,), density=0.5)
    assert_same_adapter(out, reference, base)


def test_an_adapter_naming_another_base_is_combined_with_a_note(adapters, tmp_path):
    """base_model_name_or_path is often a path on the trainer's machine: a differing one is a
    note; the base's shapes are what is checked."""
    import shutil

    base, folders = adapters
    moved = shutil.copytree(folders["b"], tmp_path / "b")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/trainer/llama"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    plan = preflight(recipe_from_text(recipe_text(base, [folders["a"], moved], "cat")))
    assert plan.notes == [
        f"{moved} says it was trained on /home/trainer/llama, not {base}; its shapes fit {base}"
    ]


def test_a_base_with_an_adapter_is_refused_for_an_adapter_output(adapters):
    base, folders = adapters
    text = recipe_text(base, [folders["a"], folders["b"]], "cat")
    text = text.replace(f"- model: {folders['b']}\n", f"- model: {base}+{folders['b']}\n")
    with pytest.raises(RecipeError) as caught:
        preflight(recipe_from_text(text))
    assert caught.value.field == "models[1].model" and "name each adapter alone" in str(
        caught.value
    )


def test_adapters_that_disagree_on_a_modules_layout_are_refused(tmp_path):
    """A square GPT-2 projection is read as its adapter's config says; two adapters that
    disagree on it (one config edited by hand) cannot be combined factor by factor."""

    def gpt2():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("gpt2"))

    base = save_model(gpt2(), tmp_path / "base")
    for name, targets in (("square", ["attn.c_proj"]), ("both", ["c_attn", "attn.c_proj"])):
        get_peft_model(gpt2(), LoraConfig(r=4, target_modules=targets)).save_pretrained(
            tmp_path / name
        )
    config_file = tmp_path / "square" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "fan_in_fan_out": False}))
    sources = [tmp_path / "square", tmp_path / "both"]
    with pytest.raises(IncompatibleModelsError) as caught:
        preflight(recipe_from_text(recipe_text(base, sources, "cat")))
    assert "transformer.h.0.attn.c_proj transposed (fan_in_fan_out)" in str(caught.value)


def test_the_card_names_the_job_the_changes_and_where_the_adapter_is_pushed(adapters):
    """What the service hands the card: its job, who asked, what moved, and the repo the
    adapter is pushed to, which the loading example names."""
    from merge_engine.output.adapter_card import build_adapter_card

    base, folders = adapters
    plan = preflight(recipe_from_text(recipe_text(base, [folders["a"], folders["b"]], "svd")))
    card = build_adapter_card(
        plan,
        name="mixed-lora",
        command="mergebot merge mergebot_recipe.yaml ./mixed-lora",
        job_id="job-123",
        credit="Requested by alice.",
        changes=["alice/a moved to 1234abcd"],
        endpoint="https://hub.example",
        repo_id="alice/mixed-lora",
    )
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "# mixed-lora" in card and "job `job-123`. Requested by alice." in card
    assert "## Changes since the last merge" in card and "- alice/a moved to 1234abcd" in card
    assert "PeftModel.from_pretrained(base, 'alice/mixed-lora')" in card
    assert "mergebot merge mergebot_recipe.yaml ./mixed-lora" in card
