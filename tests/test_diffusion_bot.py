"""The bot merging Stable Diffusion end to end: tiny SD1.5 pipelines as repos of the sandbox hub,
requests through the JSON API of a real ``mergebot serve``, and what the requester then finds on
the Hub: one commit, a diffusers pipeline (or one single file) that diffusers loads, a card that
says what was done, and the merged UNet equal to the formula."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from service_env import USERS, job_commits, start_serve

from merge_engine.example_diffusion import make_finetune, make_pipeline
from service.sandbox_hub import HubStore, SandboxHub, SandboxServer

pytestmark = pytest.mark.slow  # real processes: a server, a worker, the sandbox hub

ALICE = "tok-alice"
BLOCKS = [round(0.1 + 0.03 * i, 2) for i in range(26)]  # BASE, IN00…IN11, M00, OUT00…OUT11
BLOCK_NAMES = ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]
OTHER_WEIGHT = 0.5
BROKEN = "mid_block.resnets.0.conv1.weight"

# Tensors of the tiny SD1.5 pipeline (4 levels, 2 resnets a level) and their block, by the MBW
# convention: INnn is the LDM UNet's input_blocks.nn (0: conv_in; then per level its resnets and
# its downsampler), M00 the middle block, OUTnn output_blocks.nn (3 resnets a level, the level's
# upsampler in its last block), the UNet's final norm and conv the last OUT block, and the time
# embedding, the VAE and the text encoder BASE.
PROBES = {
    "unet/conv_in.weight": "IN00",
    "unet/down_blocks.0.resnets.0.conv1.weight": "IN01",
    "unet/down_blocks.0.attentions.1.proj_in.weight": "IN02",
    "unet/down_blocks.0.downsamplers.0.conv.weight": "IN03",
    "unet/down_blocks.2.resnets.1.conv2.weight": "IN08",
    "unet/down_blocks.3.resnets.1.conv1.weight": "IN11",
    "unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": "M00",
    "unet/up_blocks.0.resnets.0.conv1.weight": "OUT00",
    "unet/up_blocks.0.upsamplers.0.conv.weight": "OUT02",
    "unet/up_blocks.2.attentions.2.proj_out.weight": "OUT08",
    "unet/up_blocks.3.resnets.2.conv1.weight": "OUT11",
    "unet/conv_out.weight": "OUT11",
    "unet/time_embedding.linear_1.weight": "BASE",
    "vae/decoder.conv_in.weight": "BASE",
    "text_encoder/text_model.final_layer_norm.weight": "BASE",
}


@pytest.fixture(scope="module")
def sd_sources(tmp_path_factory) -> dict[str, Path]:
    """Two tiny SD1.5 fine-tunes of one base, in the diffusers layout."""
    root = tmp_path_factory.mktemp("sd")
    base = make_pipeline(root / "base", "sd1", seed=0)
    broken = make_finetune(base, root / "broken", seed=3)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors[BROKEN] = torch.full_like(tensors[BROKEN], float("nan"))
    save_file(tensors, weights, {"format": "pt"})
    return {
        "sd-dreamy": make_finetune(base, root / "dreamy", seed=1),
        "sd-sharp": make_finetune(base, root / "sharp", seed=2),
        "sd-broken": broken,  # a fine-tune whose training diverged: NaN in one UNet tensor
    }


@pytest.fixture(scope="module")
def sandbox(sd_sources):
    """The sandbox hub with the pipelines uploaded as alice's repos, with the real client."""
    server = SandboxServer(SandboxHub(HubStore(), users=dict(USERS))).__enter__()
    api = HfApi(endpoint=server.url, token=ALICE)
    for name, folder in sd_sources.items():
        api.create_repo(f"alice/{name}")
        api.upload_folder(repo_id=f"alice/{name}", folder_path=folder)
    yield server
    server.__exit__()


@pytest.fixture(scope="module")
def bot(sandbox, tmp_path_factory):
    work = tmp_path_factory.mktemp("sd-bot") / "work"
    process, api = start_serve(sandbox.url, work)
    api.process = process
    yield api
    process.stop()


def recipe(output_layout: str | None = None, blocks: list[float] = BLOCKS) -> str:
    layout = f"output_layout: {output_layout}\n" if output_layout else ""
    return f"""merge_method: linear
{layout}models:
  - model: alice/sd-dreamy
    parameters:
      weight: {{blocks: {json.dumps(blocks)}}}
  - model: alice/sd-sharp
    parameters: {{weight: {OTHER_WEIGHT}}}
"""


def merged(bot, sandbox, text: str, target: str) -> dict:
    """Submit through the API as alice, wait for the job, check it pushed exactly one commit."""
    status, job = bot.submit(text, target, ALICE)
    assert status == 202, job
    done = bot.wait_done(job["id"])
    assert done["status"] == "succeeded", (done, bot.process.log[-3000:])
    assert len(job_commits(sandbox.url, target, ALICE)) == 1
    assert len(job_commits(sandbox.url, target, ALICE, job["id"])) == 1
    return done


def download(sandbox, repo: str, folder: Path) -> Path:
    return Path(HfApi(endpoint=sandbox.url, token=ALICE).snapshot_download(repo, local_dir=folder))


def run_python(sandbox, tmp_path: Path, script: str, *args: str) -> None:
    """``script`` in a fresh interpreter, the way a user would run diffusers (offline here)."""
    env = {**os.environ, "HF_ENDPOINT": sandbox.url, "HF_HOME": str(tmp_path / "hf-home")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def expected(sources: dict[str, Path], name: str) -> torch.Tensor:
    """Linear's formula, computed here: (w_a a + w_b b) / (w_a + w_b), w_a the block's value."""
    component, key = name.split("/", 1)

    def tensor(folder: Path) -> torch.Tensor:
        (path,) = (folder / component).glob("*.safetensors")
        return load_file(path)[key]

    a, b = tensor(sources["sd-dreamy"]), tensor(sources["sd-sharp"])
    w_a = BLOCKS[BLOCK_NAMES.index(PROBES[name])]
    return (w_a * a + OTHER_WEIGHT * b) / (w_a + OTHER_WEIGHT)


def test_a_block_weighted_merge_is_pushed_as_a_diffusers_pipeline(
    bot, sandbox, sd_sources, tmp_path
):
    merged(bot, sandbox, recipe(), "alice/sd-blend")
    folder = download(sandbox, "alice/sd-blend", tmp_path / "blend")
    assert (folder / "model_index.json").is_file()
    assert {"unet", "vae", "text_encoder", "scheduler", "tokenizer"} <= {
        p.name for p in folder.iterdir() if p.is_dir()
    }

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image"
    assert {"alice/sd-dreamy", "alice/sd-sharp"} <= set(card.data.base_model)
    assert "merge" in card.data.tags
    assert "## Block weights" in card.text
    assert "| OUT11 | 0.85 |" in card.text  # the last of the 26 values, on its block's row
    header = r"^\| block \| `weight` of alice/sd-\w+@[0-9a-f]{40} \|$"  # "of" between words
    assert re.search(header, card.text, re.M), card.text

    for name in PROBES:
        component, key = name.split("/", 1)
        (path,) = (folder / component).glob("*.safetensors")
        got = load_file(path)[key]
        torch.testing.assert_close(got, expected(sd_sources, name), rtol=1e-6, atol=1e-7)

    run_python(
        sandbox,
        tmp_path,
        "import sys, torch; from diffusers import StableDiffusionPipeline;"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1]);"
        "image = pipe('a cat', height=64, width=64, num_inference_steps=1,"
        " output_type='pt', generator=torch.Generator().manual_seed(0)).images;"
        "assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()",
        str(folder),
    )


def test_a_single_file_merge_is_pushed_as_one_safetensors_file(bot, sandbox, tmp_path):
    merged(bot, sandbox, recipe("single_file"), "alice/sd-blend-single")
    api = HfApi(endpoint=sandbox.url, token=ALICE)
    files = set(api.list_repo_files("alice/sd-blend-single"))
    assert "model.safetensors" in files and "model_index.json" not in files
    assert not [f for f in files if "/" in f], files
    path = Path(
        api.hf_hub_download("alice/sd-blend-single", "model.safetensors", local_dir=tmp_path)
    )
    with safe_open(path, "pt") as weights:
        recipe_text = weights.metadata()["mergebot_recipe"]
        assert any(k.startswith("model.diffusion_model.") for k in weights.keys())  # noqa: SIM118
    assert "alice/sd-dreamy" in recipe_text and "output_layout: single_file" in recipe_text

    config = download(sandbox, "alice/sd-dreamy", tmp_path / "config")
    run_python(
        sandbox,
        tmp_path,
        "import sys, torch; from diffusers import StableDiffusionPipeline;"
        "pipe = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2],"
        " local_files_only=True);"
        "image = pipe('a cat', height=64, width=64, num_inference_steps=1,"
        " output_type='pt', generator=torch.Generator().manual_seed(0)).images;"
        "assert torch.isfinite(image).all()",
        str(path),
        str(config),
    )


def test_a_wrong_number_of_block_values_is_refused_at_submit(bot, sandbox):
    status, error = bot.submit(recipe(blocks=BLOCKS[:25]), "alice/sd-wrong", ALICE)
    assert status == 400, error
    assert error["field"] == "models[0].parameters.weight.blocks", error
    assert "25 block values" in error["error"] and "26" in error["error"], error
    assert ", ".join(BLOCK_NAMES) in error["error"], error
    assert "\n" not in error["error"]
    assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists("alice/sd-wrong")


def test_a_merge_whose_unet_gives_nan_fails_at_verify_and_pushes_nothing(bot, sandbox):
    text = recipe().replace("alice/sd-sharp", "alice/sd-broken")
    status, job = bot.submit(text, "alice/sd-nan", ALICE)
    assert status == 202, job
    done = bot.wait_done(job["id"])
    assert done["status"] == "failed" and done["stage"] == "verify", done
    assert done["error"] == (
        "the merged UNet gives NaN or infinite outputs on a test latent; check the recipe's "
        "weights (or use float32)"
    )
    assert not HfApi(endpoint=sandbox.url, token=ALICE).repo_exists("alice/sd-nan")
