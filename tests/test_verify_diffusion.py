"""The bot's last check on diffusion merges: a diffusers pipeline, its single-file form and a bare
state dict verify; a NaN anywhere that matters is refused with one sentence naming the part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_engine import merge
from merge_engine.errors import MergeError
from merge_engine.example_diffusion import make_finetune, make_pipeline, write_single_file
from merge_engine.recipe.schema import recipe_from_text
from merge_engine.sources.formats.sd_names import convert_names
from merge_engine.sources.tensors import read_header
from service.verification.diffusion import unet_config, vae_config
from service.verification.verify import verify_output

CPU = torch.device("cpu")
UNET_NAN = (
    "the merged UNet gives NaN or infinite outputs on a test latent; check the recipe's weights "
    "(or use float32)"
)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipeline(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, make_pipeline(tmp_path_factory.mktemp(family) / "pipe", family, seed=3)


@pytest.fixture(scope="module")
def single_file(pipeline, tmp_path_factory) -> tuple[str, Path]:
    family, folder = pipeline
    out = tmp_path_factory.mktemp(f"{family}-single")
    write_single_file(folder, out / "model.safetensors", family)
    return family, out


def with_nan(path: Path, name: str) -> None:
    """Rewrite one safetensors file with tensor ``name`` all NaN."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata)


def test_a_pipeline_folder_verifies(pipeline, one_thread):
    verify_output(pipeline[1], CPU)


def test_its_single_file_form_verifies(single_file, one_thread):
    verify_output(single_file[1], CPU)


@pytest.mark.parametrize(
    ("component", "tensor", "words"),
    [
        ("unet", "mid_block.resnets.0.conv1.weight", UNET_NAN),
        ("vae", "decoder.conv_in.weight", "the merged VAE gives NaN or infinite outputs"),
        ("text_encoder", "text_model.final_layer_norm.weight", "text encoder (text_encoder)"),
    ],
    ids=["unet", "vae", "text_encoder"],
)
def test_a_pipeline_with_a_nan_is_refused(pipeline, tmp_path, component, tensor, words, one_thread):
    folder = shutil.copytree(pipeline[1], tmp_path / "copy")
    weights = next((folder / component).glob("*.safetensors"))
    with_nan(weights, tensor)
    with pytest.raises(MergeError) as refused:
        verify_output(folder, CPU)
    assert words in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ("model.diffusion_model.middle_block.0.in_layers.2.weight", UNET_NAN),
        ("first_stage_model.decoder.conv_in.weight", "the merged VAE gives NaN"),
        (
            "conditioner.embedders.1.model.ln_final.weight",
            "the merged text encoder (text_encoder_2) holds NaN or infinite values in "
            "conditioner.embedders.1.model.ln_final.weight",
        ),
    ],
    ids=["unet", "vae", "text_encoder"],
)
def test_a_single_file_with_a_nan_is_refused(single_file, tmp_path, tensor, words, one_thread):
    family, folder = single_file
    if tensor.startswith("conditioner.") and family != "sdxl":
        tensor = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        words = f"the merged text encoder (text_encoder) holds NaN or infinite values in {tensor}"
    copy = shutil.copytree(folder, tmp_path / "copy")
    with_nan(copy / "model.safetensors", tensor)
    with pytest.raises(MergeError) as refused:
        verify_output(copy, CPU)
    assert words in str(refused.value)


def test_a_unet_that_does_not_load_is_refused(pipeline, tmp_path, one_thread):
    folder = shutil.copytree(pipeline[1], tmp_path / "copy")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_in.weight"]
    save_file(tensors, weights)
    with pytest.raises(MergeError, match=r"^the merged UNet does not load with diffusers \("):
        verify_output(folder, CPU)


def test_the_configs_read_off_the_shapes_are_the_pipelines(single_file, pipeline):
    family, folder = single_file
    shapes = {n: i.shape for n, i in read_header(folder / "model.safetensors").items()}
    targets, _ = convert_names(family, shapes, to="diffusers")

    def of(component: str) -> dict[str, tuple[int, ...]]:
        return {r.name.split("/", 1)[1]: r.shape for r in targets if r.name.startswith(component)}

    pooled = of("text_encoder_2/").get("text_projection.weight", (None,))[0]
    inferred = unet_config(of("unet/"), pooled)
    real = json.loads((pipeline[1] / "unet" / "config.json").read_text())
    depth = real["transformer_layers_per_block"]
    real["transformer_layers_per_block"] = depth if isinstance(depth, list) else [depth] * 4
    for key in (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "block_out_channels",
        "layers_per_block",
        "transformer_layers_per_block",
        "cross_attention_dim",
        "use_linear_projection",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    ):
        assert list(_listed(inferred.get(key))) == list(_listed(real.get(key))), key
    vae = vae_config(of("vae/"), family)
    real_vae = json.loads((pipeline[1] / "vae" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types"):
        assert list(_listed(vae[key])) == list(_listed(real_vae[key])), key


def _listed(value):
    return value if isinstance(value, list | tuple) else [value]


def test_an_engine_merge_of_the_unet_alone_verifies(pipeline, tmp_path, one_thread):
    family, folder = pipeline
    tuned = make_finetune(folder, tmp_path / "tuned", seed=4)
    keep = "model.diffusion_model."
    recipe = recipe_from_text(
        f"""merge_method: linear
output_layout: single_file
discard: ['^(first_stage_model|cond_stage_model|conditioner)\\.']
out_dtype: float16
models:
  - {{model: {folder}, parameters: {{weight: 0.5}}}}
  - {{model: {tuned}, parameters: {{weight: 0.5}}}}
"""
    )
    out = merge(recipe, tmp_path / "out", device="cpu", show_progress=False)
    names = read_header(Path(out) / "model.safetensors")
    assert names and all(n.startswith(keep) for n in names)
    verify_output(Path(out), CPU)


def test_a_bare_state_dict_verifies_and_a_nan_is_named(tmp_path):
    tensors = {
        "encoder.weight": torch.randn(4, 4),
        "encoder.bias": torch.randn(4, dtype=torch.float16),
        "steps": torch.tensor([3], dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    verify_output(tmp_path, CPU)
    tensors["encoder.bias"][1] = float("inf")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MergeError, match=r"^the merged tensor encoder\.bias holds NaN or infinite"):
        verify_output(tmp_path, CPU)
