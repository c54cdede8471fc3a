"""PEFT LoRA adapters as sources (``model: base+adapter``): mergebot's adapted tensors against
PEFT's own ``merge_and_unload`` on the same adapter, merges of adapted models against merges of
the models PEFT baked, the CLI, a Hub composite pinned in both parts, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_weights, write_recipe
from peft_adapters import bake, save_adapter

from merge_engine import load_recipe, merge, preflight
from merge_engine.cli import main
from merge_engine.errors import MergeError
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.inspection import inspect_model
from merge_engine.sources.low_rank import AdaptedStore
from merge_engine.sources.tensors import MemoryStore

LLAMA_LORA = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens"],
    modules_to_save=["lm_head"],
    rank_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 4},
    alpha_pattern={"v_proj": 7},
)
GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_rslora=True)


def test_a_composite_reference_parses_prints_back_and_pins_each_part():
    ref = ModelReference.parse("org/base@v1+org/lora")
    assert (ref.path, ref.revision, str(ref)) == ("org/base", "v1", "org/base@v1+org/lora")
    assert ref.base == ModelReference("org/base", "v1") and ref.base.adapter is None
    assert ref.adapter == ModelReference("org/lora")
    assert ref.parts() == [ref.base, ref.adapter]
    assert ModelReference.parse("org/base").parts() == [ModelReference("org/base")]
    assert ref != ref.base and ModelReference.parse(str(ref)) == ref
    pinned = ref.with_revisions({ref.base: "a" * 40, ModelReference("org/lora"): "b" * 40})
    assert str(pinned) == f"org/base@{'a' * 40}+org/lora@{'b' * 40}"
    assert ref.with_revisions({}) == ref


@pytest.mark.parametrize(
    ("model", "sentence"),
    [
        ("org/base+", "'org/base+' has nothing on one side of '+'; write base+adapter"),
        ("org/a+org/b+org/c", "'org/a+org/b+org/c' applies more than one adapter ('+' twice)"),
        (
            "org/base+org/--lora",
            "models[0].model: model 'org/--lora' is not a name the Hub accepts",
        ),
    ],
)
def test_a_bad_composite_reference_is_refused_when_the_recipe_is_read(model, sentence):
    from merge_engine.errors import RecipeError
    from merge_engine.recipe.schema import parse_recipe

    with pytest.raises(RecipeError) as caught:
        parse_recipe({"merge_method": "passthrough", "models": [{"model": model}]})
    assert sentence in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_low_rank_delta_equals_peft_on_linear_conv_and_embedding_layers(dtype):
    """The arithmetic kohya LoRAs share: 1x1 and 3x3 convolutions beside linear layers and an
    embedding, against PEFT's merge of the same weights."""
    from peft import LoraConfig, get_peft_model

    from merge_engine.sources.low_rank import LowRankDelta

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.embedding = torch.nn.Linear(8, 6), torch.nn.Embedding(10, 6)
            self.pointwise, self.kernel = torch.nn.Conv2d(4, 5, 1), torch.nn.Conv2d(4, 5, 3)

    torch.manual_seed(0)
    model = Layers().to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    modules = ["linear", "embedding", "pointwise", "kernel"]
    config = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=modules)
    peft_model = get_peft_model(model, config)
    adapter = MemoryStore({k: v.detach().clone() for k, v in peft_model.state_dict().items()})
    expected = peft_model.merge_and_unload().state_dict()
    prefix = "base_model.model."
    deltas = {
        f"{m}.weight": [
            LowRankDelta(
                adapter,
                f"{prefix}{m}.lora_B.default.weight",
                f"{prefix}{m}.lora_A.default.weight",
                2.5,
            )
        ]
        for m in ("linear", "pointwise", "kernel")
    }
    deltas["embedding.weight"] = [
        LowRankDelta(
            adapter,
            f"{prefix}embedding.lora_embedding_B.default",
            f"{prefix}embedding.lora_embedding_A.default",
            2.5,
            fan_in_fan_out=True,
            rounded_first=True,
        )
    ]
    store = AdaptedStore(MemoryStore(base), deltas)
    for name in base:
        assert torch.equal(store.get(name), expected[name]), name


def in_dtype(folder: Path, dtype: torch.dtype, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapted(llama_family, gpt2_family, tmp_path_factory):
    """Per family and dtype: the base, its adapter, and PEFT's baked weights."""
    root = tmp_path_factory.mktemp("adapted")
    found = {}
    for family, (base, _), lora in (
        ("llama", llama_family, LLAMA_LORA),
        ("gpt2", gpt2_family, GPT2_LORA),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{family}-{str(dtype).removeprefix('torch.')}"
            typed = in_dtype(base, dtype, root / name / "base")
            adapter = save_adapter(typed, root / name / "adapter", **lora)
            found[name] = (typed, adapter, bake(typed, adapter))
    return found


@pytest.mark.parametrize(
    "name", ["llama-float32", "llama-bfloat16", "gpt2-float32", "gpt2-bfloat16"]
)
def test_base_plus_adapter_equals_peft_merge_and_unload(adapted, name, tmp_path, one_thread):
    base, adapter, expected = adapted[name]
    recipe = write_recipe(
        tmp_path, f"merge_method: passthrough\nmodels: [{{model: {base}+{adapter}}}]\n"
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    merged = load_weights(tmp_path / "out")
    changed = [k for k in merged if not torch.equal(merged[k], load_weights(base)[k])]
    assert len(changed) >= 12  # the adapter changed every module it targets
    assert merged.keys() <= expected.keys()
    for key, tensor in merged.items():
        assert tensor.dtype == expected[key].dtype
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merging_an_adapted_model_equals_merging_the_baked_model(
    llama_family, tmp_path, method, one_thread
):
    base, (a, b, _) = llama_family
    adapter = save_adapter(a, tmp_path / "lora_a", seed=3, **LLAMA_LORA)
    bake(a, adapter, tmp_path / "a-baked")
    recipe = (
        "merge_method: {method}\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\ndtype: float32\n"
    )
    outputs = {}
    for label, first in (("adapted", f"{a}+{adapter}"), ("baked", tmp_path / "a-baked")):
        folder = tmp_path / label
        folder.mkdir()
        text = recipe.format(method=method, base=base, a=first, b=b)
        if method == "linear":
            text = text.replace(f"base_model: {base}\n", "").replace(", density: 0.5", "")
            text = text.replace(", density: 0.7", "")
        merge(
            preflight(load_recipe(write_recipe(folder, text))), folder / "out", show_progress=False
        )
        outputs[label] = load_weights(folder / "out")
    assert outputs["adapted"].keys() == outputs["baked"].keys()
    for key, tensor in outputs["adapted"].items():
        assert torch.equal(tensor, outputs["baked"][key]), key


def test_a_merge_with_data_and_a_search_run_the_adapted_model(tmp_path, one_thread):
    """RegMean's statistics come from running each model on its data, and a search's
    candidates from models loaded whole: both see the adapter applied."""
    from merge_engine.evolve.candidates import load_source
    from merge_engine.example import make_family, save_tiny_tokenizer

    _, (a, b) = make_family(tmp_path / "models", "llama", finetunes=2, seed=3, scale=0.05)
    adapter = save_adapter(a, tmp_path / "lora", seed=5, target_modules=["q_proj", "up_proj"])
    baked = tmp_path / "baked"
    expected = bake(a, adapter, baked)
    for folder in (a, b, baked):
        save_tiny_tokenizer(folder)
    (tmp_path / "data.txt").write_text("\n".join(f"{i} + {i} = {2 * i}" for i in range(20)))
    outputs = {}
    for label, first in (("adapted", f"{a}+{adapter}"), ("baked", baked)):
        recipe = write_recipe(
            tmp_path,
            f"merge_method: regmean\nmodels: [{{model: {first}}}, {{model: {b}}}]\n"
            f"calibration: {{path: {tmp_path / 'data.txt'}, samples: 8, batch_size: 4}}\n",
        )
        merge(preflight(load_recipe(recipe)), tmp_path / f"{label}-out", show_progress=False)
        outputs[label] = load_weights(tmp_path / f"{label}-out")
    for key, tensor in outputs["adapted"].items():
        assert torch.equal(tensor, outputs["baked"][key]), key

    loaded = load_source(ModelReference.parse(f"{a}+{adapter}"), torch.device("cpu"))
    for key, tensor in loaded.source.memory.items():
        assert torch.equal(tensor, expected[key]), key


def test_the_card_and_the_pinned_recipe_name_a_local_adapter(adapted, tmp_path):
    base, adapter, _ = adapted["llama-float32"]
    recipe = write_recipe(
        tmp_path, f"merge_method: passthrough\nmodels: [{{model: {base}+{adapter}}}]\n"
    )
    plan = preflight(load_recipe(recipe))
    assert plan.pinned_recipe().models[0].model == ModelReference.parse(f"{base}+{adapter}")
    merge(plan, tmp_path / "out", show_progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"+ adapter `{adapter}` (local folder) (PEFT LoRA, rank 2/3/4" in card
    assert "| local + local |" in card


def test_an_adapter_is_applied_one_tensor_at_a_time(adapted):
    """Reading one tensor reads that tensor of the base and the two of its own adapter
    module, nothing else: the adapter is never applied to a whole model at once."""
    base, adapter, _ = adapted["llama-float32"]
    source = inspect_model(ModelReference.parse(f"{base}+{adapter}"))
    reads: list[str] = []

    class Recording(MemoryStore):
        def get(self, name: str) -> torch.Tensor:
            reads.append(name)
            return super().get(name)

    store = source.store()
    assert isinstance(store, AdaptedStore)
    base_store = Recording({k: store.base.get(k) for k in source.tensors})
    adapter_store = Recording(load_weights(adapter))
    recorded = AdaptedStore(
        base_store,
        source.adapter.deltas(adapter_store),
        source.adapter.replacements(adapter_store),
    )
    name = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(recorded.get(name), store.get(name))
    prefix = "base_model.model.model.layers.2.self_attn.q_proj"
    assert reads == [name, f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight"]


def _peft_config(folder: Path, **changes) -> Path:
    import json

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.fixture(scope="module")
def bad_adapters(llama_family, tmp_path_factory):
    """Adapters that mergebot refuses, each for one reason."""
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merge_engine.example import make_family

    root = tmp_path_factory.mktemp("bad-adapters")
    base, _ = llama_family
    wide, _ = make_family(root / "wide", "llama", finetunes=0, hidden_size=48)
    found = {"wide": save_adapter(wide, root / "wide-lora", target_modules=["q_proj"])}
    found["dora"] = save_adapter(base, root / "dora", target_modules=["q_proj"], use_dora=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoHaConfig(target_modules=["q_proj"])).save_pretrained(root / "loha")
    found["loha"] = root / "loha"
    found["plain"] = save_adapter(base, root / "plain", target_modules=["q_proj"])
    found["bias"] = _peft_config(shutil.copytree(found["plain"], root / "bias"), lora_bias=True)
    return found


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    from merge_engine.example_diffusion import make_pipeline

    return make_pipeline(tmp_path_factory.mktemp("sd") / "sd1", "sd1")


BAD_CASES = [
    (
        "shapes that do not fit",
        "{base}+{wide}",
        "adapter {wide} changes model.layers.0.self_attn.q_proj with an update of "
        "shape (48, 48), but {base} has model.layers.0.self_attn.q_proj.weight of shape (32, 32); "
        "apply it to the model it was trained on",
    ),
    (
        "DoRA",
        "{base}+{dora}",
        "adapter {dora} is DoRA (use_dora: true), which mergebot does not apply; "
        "bake it into its base with PEFT's merge_and_unload and name the baked model, or use a plain LoRA",
    ),
    (
        "another PEFT type",
        "{base}+{loha}",
        "adapter {loha} is a PEFT 'LOHA' adapter; mergebot applies LoRA adapters "
        "only (peft_type LORA)",
    ),
    (
        "a trained bias",
        "{base}+{bias}",
        "adapter {bias} is LoRA with a trained bias (lora_bias: true)",
    ),
    (
        "a diffusion base",
        "{sd}+{plain}",
        "{sd} is a Stable Diffusion checkpoint and {plain} a PEFT adapter for "
        "language models, so '+' cannot apply it",
    ),
    (
        "an adapter named as a model",
        "{plain}",
        "{plain} is a PEFT adapter, not a model; apply it to its base model as base+adapter",
    ),
    (
        "a model named as an adapter",
        "{base}+{base}",
        "{base} has no adapter_config.json, so it is not a PEFT adapter",
    ),
]


@pytest.mark.parametrize(("label", "model", "sentence"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_a_bad_adapter_gets_one_sentence_and_nothing_is_written(
    llama_family, bad_adapters, sd_pipeline, tmp_path, label, model, sentence
):
    names = {"base": llama_family[0], "sd": sd_pipeline, **bad_adapters}
    recipe = write_recipe(
        tmp_path, f"merge_method: passthrough\nmodels: [{{model: {model.format(**names)}}}]\n"
    )
    with pytest.raises(MergeError) as caught:
        merge(preflight(load_recipe(recipe)), tmp_path / "out", show_progress=False)
    message = str(caught.value)
    assert message.startswith(sentence.format(**names)), message
    assert message.count(". ") == 0 and "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # starts mergebot in a subprocess against the sandbox hub
def test_a_hub_composite_is_pinned_in_both_parts_and_equals_peft(adapted, tmp_path):
    from huggingface_hub import HfApi
    from test_sources_hub import TOKEN, mergebot

    from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

    base, adapter, expected = adapted["gpt2-float32"]
    with SandboxServer(SandboxHub(HubStore(), users={TOKEN: "alice"})) as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        for name, folder in (("base", base), ("lora", adapter)):
            api.create_repo(f"alice/{name}")
            api.upload_folder(
                repo_id=f"alice/{name}", folder_path=folder, ignore_patterns=["README.md"]
            )
        api.upload_file(
            repo_id="alice/lora", path_or_fileobj=b"\0" * 1000, path_in_repo="optimizer.pt"
        )
        shas = {name: api.model_info(f"alice/{name}").sha for name in ("base", "lora")}
        recipe = write_recipe(
            tmp_path, "merge_method: passthrough\nmodels: [{model: alice/base@main+alice/lora}]\n"
        )
        before = len(server.hub.requests)
        run = mergebot(server, tmp_path, "validate", str(recipe))
        assert run.returncode == 0, run.stderr
        assert f"alice/base@main: {shas['base']}" in run.stdout
        assert f"+ adapter alice/lora: {shas['lora']} (PEFT LoRA, rank 2, 12 modules)" in run.stdout
        run = mergebot(server, tmp_path, "merge", str(recipe), str(tmp_path / "out"), "--quiet")
        assert run.returncode == 0, run.stderr
        missing = write_recipe(
            tmp_path, "merge_method: passthrough\nmodels: [{model: alice/base+alice/nope}]\n"
        )
        refused = mergebot(server, tmp_path, "merge", str(missing), str(tmp_path / "no"))
        fetched = {
            r.path.rsplit("/", 1)[-1] for r in server.hub.requests[before:] if "/resolve/" in r.path
        }
    assert "optimizer.pt" not in fetched
    assert refused.returncode != 0 and not (tmp_path / "no").exists()
    assert "model repo alice/nope does not exist on the Hub or is private" in refused.stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= fetched
    merged = load_weights(tmp_path / "out")
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    pinned = f"alice/base@{shas['base']}+alice/lora@{shas['lora']}"
    assert pinned in (tmp_path / "out" / "mergebot_recipe.yaml").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| `{shas['base']}` + `{shas['lora']}` |" in card
    assert (
        f"+ adapter [alice/lora]({server.url}/alice/lora) (PEFT LoRA, rank 2, 12 modules)" in card
    )
