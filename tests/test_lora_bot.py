"""LoRA adapters through the bot end to end, each a request through the JSON API of a real
``mergebot serve``, merged by its worker and pushed to the sandbox hub in one commit with its
card: a ``base+adapter`` merge (both repos pinned), PEFT adapters combined into a PEFT adapter
repo, and Stable Diffusion LoRA files merged into one LoRA file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from huggingface_hub import HfApi
from peft_adapters import bake, save_adapter
from safetensors import safe_open
from safetensors.torch import load_file
from service_env import job_commits, start_sandbox, start_serve

from merge_engine import load_recipe, merge, preflight

pytestmark = pytest.mark.slow  # real processes: a server, a worker, the sandbox hub

ALICE = "tok-alice"
LORA = dict(target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def adapters(llama_family, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters of the family's base."""
    base, _ = llama_family
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_adapter(base, root / name, seed=seed, **LORA)
        for name, seed in (("math-lora", 1), ("code-lora", 2))
    }


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1.5 pipeline and two LoRA files, each a fine-tune of it extracted at rank 4."""
    from merge_engine.example_diffusion import make_finetune, make_pipeline
    from merge_engine.extract.sd_lora import extract_sd_lora, plan_sd_extraction
    from merge_engine.recipe.schema import ModelReference
    from merge_engine.sources.inspection import inspect_model

    root = tmp_path_factory.mktemp("sd")
    base = make_pipeline(root / "sd-base", "sd1", seed=0)
    found = {"sd-base": base}
    for name, seed in (("sd-lora-a", 1), ("sd-lora-b", 2)):
        tuned = make_finetune(base, root / f"tuned-{seed}", seed=seed, noise=0.05)
        sources = [inspect_model(ModelReference(str(folder))) for folder in (tuned, base)]
        extract_sd_lora(plan_sd_extraction(*sources, rank=4), root / name)
        found[name] = root / name
    return found


@pytest.fixture(scope="module")
def sandbox(llama_family, adapters, sd_loras):
    server = start_sandbox({"alice": llama_family})
    api = HfApi(endpoint=server.url, token=ALICE)
    for name, folder in {**adapters, **sd_loras}.items():
        api.create_repo(f"alice/{name}")
        # PEFT's own card names the base by its local path, which the Hub refuses
        api.upload_folder(repo_id=f"alice/{name}", folder_path=folder, ignore_patterns="README.md")
    yield server
    server.__exit__()


@pytest.fixture(scope="module")
def bot(sandbox, tmp_path_factory):
    work = tmp_path_factory.mktemp("bot") / "work"
    process, api = start_serve(sandbox.url, work)
    api.process = process
    yield api
    process.stop()


def download_weights(sandbox, repo: str, folder: Path) -> dict[str, torch.Tensor]:
    """The published model as transformers loads it from the sandbox hub."""
    script = (
        "import sys; from transformers import AutoModelForCausalLM;"
        "from safetensors.torch import save_file;"
        f"m = AutoModelForCausalLM.from_pretrained({repo!r}, token={ALICE!r});"
        "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])"
    )
    env = {**os.environ, "HF_ENDPOINT": sandbox.url, "HF_HOME": str(folder / "hf")}
    subprocess.run(
        [sys.executable, "-c", script, str(folder / "w.safetensors")], env=env, check=True
    )
    return load_weights(folder)


def test_a_base_plus_adapter_request_is_pinned_in_both_parts_and_published_with_its_card(
    bot, sandbox, llama_family, adapters, tmp_path
):
    recipe = """merge_method: linear
models:
  - model: alice/base+alice/math-lora
    parameters: {weight: 0.5}
  - model: alice/code
    parameters: {weight: 0.5}
"""
    status, job = bot.submit(recipe, "alice/adapted-merge", ALICE)
    assert status == 202, job
    api = HfApi(endpoint=sandbox.url, token=ALICE)
    shas = {repo: api.model_info(repo).sha for repo in ("alice/base", "alice/math-lora")}
    assert {repo: job["sources"][repo] for repo in shas} == shas
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", done

    base, (_, code, _) = llama_family
    baked = bake(base, adapters["math-lora"])
    tuned = load_weights(code)
    got = download_weights(sandbox, "alice/adapted-merge", tmp_path)
    for name, tensor in baked.items():
        torch.testing.assert_close(got[name], 0.5 * tensor + 0.5 * tuned[name], rtol=0, atol=1e-7)

    assert len(job_commits(sandbox.url, "alice/adapted-merge", ALICE, job["id"])) == 1
    card = Path(
        api.hf_hub_download("alice/adapted-merge", "README.md", local_dir=tmp_path / "card")
    ).read_text()
    pinned = api.hf_hub_download(
        "alice/adapted-merge", "mergebot_recipe.yaml", local_dir=tmp_path / "card"
    )
    assert f"alice/base@{shas['alice/base']}+alice/math-lora@{shas['alice/math-lora']}" in (
        Path(pinned).read_text()
    )
    assert "alice/math-lora" in card and shas["alice/math-lora"] in card


def test_an_adapter_output_is_published_as_a_peft_repo_that_peft_loads(
    bot, sandbox, llama_family, adapters, tmp_path
):
    recipe = """output: adapter
merge_method: linear
base_model: alice/base
models:
  - model: alice/math-lora
    parameters: {weight: 0.7}
  - model: alice/code-lora
    parameters: {weight: 0.3}
"""
    status, job = bot.submit(recipe, "alice/merged-lora", ALICE)
    assert status == 202, job
    api = HfApi(endpoint=sandbox.url, token=ALICE)
    repos = ("alice/base", "alice/math-lora", "alice/code-lora")
    assert {repo: job["sources"][repo] for repo in repos} == {
        repo: api.model_info(repo).sha for repo in repos
    }
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", done
    assert len(job_commits(sandbox.url, "alice/merged-lora", ALICE, job["id"])) == 1
    files = set(api.list_repo_files("alice/merged-lora"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    card = Path(
        api.hf_hub_download("alice/merged-lora", "README.md", local_dir=tmp_path / "card")
    ).read_text()
    assert "library_name: peft" in card and "base_model: alice/base" in card
    assert job["id"] in card

    # PEFT loads it from the Hub onto the base, and it is PEFT's own linear combination
    script = (
        "import sys, torch; from peft import PeftModel;"
        "from transformers import AutoModelForCausalLM;"
        "base = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        f"m = PeftModel.from_pretrained(base, 'alice/merged-lora', token={ALICE!r});"
        "torch.save(m(torch.tensor([[1, 2, 3]])).logits, sys.argv[2])"
    )
    env = {**os.environ, "HF_ENDPOINT": sandbox.url, "HF_HOME": str(tmp_path / "hf")}
    base, _ = llama_family
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(base), str(out)], env=env, check=True)
    torch.testing.assert_close(
        torch.load(out, weights_only=True), peft_linear_logits(base, adapters, (0.7, 0.3))
    )


def peft_linear_logits(base: Path, adapters: dict[str, Path], weights) -> torch.Tensor:
    """PEFT's own ``add_weighted_adapter(combination_type="linear")`` of the two adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapters["math-lora"], adapter_name="math"
    )
    model.load_adapter(adapters["code-lora"], adapter_name="code")
    model.add_weighted_adapter(["math", "code"], list(weights), "both", combination_type="linear")
    model.set_adapter("both")
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3]])).logits


def test_sd_lora_files_merged_into_one_are_published_as_one_file_with_the_recipe(
    bot, sandbox, sd_loras, tmp_path
):
    recipe = """output: adapter
merge_method: cat
base_model: alice/sd-base
models:
  - model: alice/sd-lora-a
    parameters: {weight: 0.5}
  - model: alice/sd-lora-b
    parameters: {weight: 1.0}
"""
    status, job = bot.submit(recipe, "alice/merged-sd-lora", ALICE)
    assert status == 202, job
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", done
    api = HfApi(endpoint=sandbox.url, token=ALICE)
    assert len(job_commits(sandbox.url, "alice/merged-sd-lora", ALICE, job["id"])) == 1
    assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(
        api.list_repo_files("alice/merged-sd-lora")
    )
    shas = {repo: api.model_info(repo).sha for repo in ("alice/sd-lora-a", "alice/sd-lora-b")}
    card = Path(
        api.hf_hub_download("alice/merged-sd-lora", "README.md", local_dir=tmp_path / "hub")
    ).read_text()
    assert "library_name: diffusers" in card and "base_model: alice/sd-base" in card
    assert all(sha in card for sha in shas.values()) and job["id"] in card
    published = Path(
        api.hf_hub_download(
            "alice/merged-sd-lora", "pytorch_lora_weights.safetensors", local_dir=tmp_path / "hub"
        )
    )
    with safe_open(str(published), "pt") as file:
        pinned = file.metadata()["mergebot_recipe"]
        got = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    assert all(f"{repo}@{sha}" in pinned for repo, sha in shas.items())

    # the same files merged from local folders by the engine give the same file
    local = tmp_path / "local.yaml"
    local.write_text(
        recipe.replace("alice/sd-base", str(sd_loras["sd-base"]))
        .replace("alice/sd-lora-a", str(sd_loras["sd-lora-a"]))
        .replace("alice/sd-lora-b", str(sd_loras["sd-lora-b"]))
    )
    merge(preflight(load_recipe(local)), tmp_path / "out", show_progress=False)
    expected = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert got.keys() == expected.keys()
    assert all(got[name].equal(expected[name]) for name in expected)
