"""LoRA adapters through the bot end to end: a ``base+adapter`` request through the JSON API of
a real ``mergebot serve``, both repos pinned, merged by its worker and pushed to the sandbox hub
in one commit whose card names the adapter at its commit."""

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
from service_env import job_commits, start_sandbox, start_serve

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
def sandbox(llama_family, adapters):
    server = start_sandbox({"alice": llama_family})
    api = HfApi(endpoint=server.url, token=ALICE)
    for name, folder in adapters.items():
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
