"""The Stable Diffusion name map (merge_engine.sources.formats.sd_names) against diffusers' own converter.

Tiny SD1.5- and SDXL-shaped pipelines (merge_engine/example_diffusion.py) are written as single files with
our diffusers -> single_file map and read back by diffusers' independent single_file -> diffusers
converter; our map back to diffusers must give the original tensors exactly. Real-size UNets,
VAEs and OpenCLIP text encoders are checked on the meta device (names and shapes only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from merge_engine.example_diffusion import (
    COMPONENTS,
    make_finetune,
    make_pipeline,
    write_single_file,
)
from merge_engine.sources.formats.sd_names import Renamed, convert_names

PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _diffusers_tensors(folder: Path, family: str) -> dict[str, torch.Tensor]:
    out = {}
    for component in COMPONENTS[family]:
        (path,) = (folder / component).glob("*.safetensors")
        out |= {f"{component}/{k}": v for k, v in load_file(path).items()}
    return out


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _apply(targets: list[Renamed], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {r.name: r.apply([tensors[p] for p in r.parts]) for r in targets}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def finetune(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, a fine-tune's diffusers folder, the same as a single file). Every weight is
    base + noise, so no tensor equals its default init (a tensor diffusers failed to load would
    show)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = make_pipeline(root / "base", family, seed=0)
    folder = make_finetune(base, root / "finetune", seed=1)
    return family, folder, write_single_file(folder, root / "model.safetensors", family)


def test_diffusers_reads_our_single_file(finetune):
    family, folder, single = finetune
    cls = PIPELINES[family]
    loaded = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    original = cls.from_pretrained(folder, local_files_only=True)
    for component in COMPONENTS[family]:
        got, want = (
            getattr(loaded, component).state_dict(),
            getattr(original, component).state_dict(),
        )
        assert got.keys() == want.keys(), component
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{component}/{key}"


def test_round_trip(finetune):
    family, folder, single = finetune
    original = _diffusers_tensors(folder, family)
    tensors = load_file(single)

    # every single-file tensor is one that the diffusers tensors make, and no more
    to_single, dropped = convert_names(family, _shapes(original), to="single_file")
    assert dropped == []
    assert {r.name for r in to_single} == set(tensors)
    assert all(tuple(tensors[r.name].shape) == r.shape for r in to_single)

    targets, dropped = convert_names(family, _shapes(tensors), to="diffusers")
    assert dropped == []
    assert [r.name for r in targets] == sorted(original)
    back = _apply(targets, tensors)
    for name, value in original.items():
        assert torch.equal(back[name], value), name


def test_single_file_layout(finetune):
    family, _, single = finetune
    tensors = load_file(single)
    vae_q = tensors["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)
    if family == "sd1":
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in tensors
        assert "model.diffusion_model.input_blocks.9.0.op.weight" in tensors
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    else:
        prefix = "conditioner.embedders.1.model."
        assert "model.diffusion_model.label_emb.0.0.weight" in tensors
        assert (
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight"
            in tensors
        )
        assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in tensors
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors
        assert tensors[prefix + "text_projection"].shape == (24, 12)  # [hidden, proj]
        assert tensors[prefix + "transformer.resblocks.1.attn.in_proj_weight"].shape == (72, 24)


def test_dropped_names(tmp_path):
    folder = make_pipeline(tmp_path / "sd1", "sd1")
    tensors = load_file(write_single_file(folder, tmp_path / "model.safetensors", "sd1"))
    extra = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "alphas_cumprod": torch.ones(1000),
    }
    path = tmp_path / "with_extra.safetensors"
    save_file(tensors | extra, path)
    shapes = _shapes(load_file(path))
    assert shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] == (1, 77)
    targets, dropped = convert_names("sd1", shapes, to="diffusers")
    assert dropped == sorted(extra)
    assert [r.name for r in targets] == sorted(_diffusers_tensors(folder, "sd1"))


def test_vae_alone(tmp_path):
    folder = make_finetune(make_pipeline(tmp_path / "base", "sd1"), tmp_path / "ft", seed=3)
    original = {k: v for k, v in _diffusers_tensors(folder, "sd1").items() if k.startswith("vae/")}
    targets, dropped = convert_names("sd1", _shapes(original), to="single_file")
    assert dropped == [] and all(r.name.startswith("first_stage_model.") for r in targets)
    single = {k: v.contiguous() for k, v in _apply(targets, original).items()}

    targets, dropped = convert_names("sd1", _shapes(single), to="diffusers")
    assert dropped == []
    back = _apply(targets, single)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    # the same VAE baked into an SDXL single file converts the same way
    assert convert_names("sdxl", _shapes(single), to="diffusers")[0] == targets


def test_text_encoder_saved_without_text_model_prefix(tmp_path):
    # transformers >= 5.6 saves CLIPTextModel without "text_model."; both spellings are read, and
    # "text_model." is written (what the Hub's repos have and every transformers version loads).
    folder = make_pipeline(tmp_path / "sd1", "sd1")
    hub = {
        k: v for k, v in _diffusers_tensors(folder, "sd1").items() if k.startswith("text_encoder/")
    }
    flat = {k.replace("/text_model.", "/"): v for k, v in hub.items()}
    assert set(flat) != set(hub)
    to_single = [convert_names("sd1", _shapes(d), to="single_file")[0] for d in (hub, flat)]
    assert [r.name for r in to_single[0]] == [r.name for r in to_single[1]]
    targets, _ = convert_names("sd1", {r.name: r.shape for r in to_single[1]}, to="diffusers")
    assert [r.name for r in targets] == sorted(hub)


def test_fused_qkv_is_split_into_views():
    shapes = {
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
        "conditioner.embedders.1.model.text_projection": (4, 3),
    }
    targets, _ = convert_names("sdxl", shapes, to="diffusers")
    by_name = {r.name: r for r in targets}
    fused, projection = torch.randn(12, 4), torch.randn(4, 3)
    q = by_name["text_encoder_2/text_model.encoder.layers.0.self_attn.q_proj.weight"]
    v = by_name["text_encoder_2/text_model.encoder.layers.0.self_attn.v_proj.weight"]
    assert (q.op, q.rows, v.rows) == ("rows", (0, 4), (8, 12))
    assert v.apply([fused]).data_ptr() == fused[8:].data_ptr()  # a view, no copy
    proj = by_name["text_encoder_2/text_projection.weight"]
    assert (proj.op, proj.shape) == ("transpose", (3, 4))
    assert torch.equal(proj.apply([projection]), projection.t())

    back, _ = convert_names("sdxl", {r.name: r.shape for r in targets}, to="single_file")
    concat = next(r for r in back if r.name.endswith("in_proj_weight"))
    assert concat.op == "concat" and [p.rsplit(".", 2)[-2] for p in concat.parts] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert concat.shape == (12, 4)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="input_blocks.1.7.weight"):
        convert_names(
            "sd1", {"model.diffusion_model.input_blocks.1.7.weight": (4,)}, to="diffusers"
        )
    with pytest.raises(ValueError, match="encoder.mid_block.mystery"):
        convert_names("sd1", {"vae/encoder.mid_block.mystery.weight": (4,)}, to="single_file")


# Real SD1.5 and SDXL structures at full width, on the meta device: names and shapes only.
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SDXL_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
)


@pytest.mark.parametrize("family,config", [("sd1", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_real_size_unet_and_vae_match_diffusers_converter(family, config):
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**config), AutoencoderKL(**SD_VAE)
    original = {f"unet/{k}": v for k, v in unet.state_dict().items()}
    original |= {f"vae/{k}": v for k, v in vae.state_dict().items()}
    to_single, dropped = convert_names(family, _shapes(original), to="single_file")
    assert dropped == []
    single = _apply(to_single, original)
    if family == "sd1":
        assert "model.diffusion_model.output_blocks.8.2.conv.weight" in single
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in single
    else:
        assert (
            "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight" in single
        )
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in single

    # diffusers' own single_file -> diffusers converter gives back the names and shapes
    unet_back = convert_ldm_unet_checkpoint(single, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in unet_back.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }
    vae_back = convert_ldm_vae_checkpoint(single, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in vae_back.items()} == {
        k: tuple(v.shape) for k, v in vae.state_dict().items()
    }
    # and so does ours
    targets, dropped = convert_names(family, _shapes(single), to="diffusers")
    assert dropped == [] and {r.name: r.shape for r in targets} == _shapes(original)


def test_real_size_open_clip_matches_diffusers_converter():
    config = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    original = {f"text_encoder_2/{k}": v for k, v in model.state_dict().items()}
    to_single, dropped = convert_names("sdxl", _shapes(original), to="single_file")
    assert dropped == []
    single = _apply(to_single, original)
    assert single[
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    ].shape == (3840, 1280)

    back = convert_open_clip_checkpoint(model, single, prefix="conditioner.embedders.1.model.")
    assert {f"text_encoder_2/{k}": tuple(v.shape) for k, v in back.items()} == _shapes(original)
    targets, dropped = convert_names("sdxl", _shapes(single), to="diffusers")
    assert dropped == [] and {r.name: r.shape for r in targets} == _shapes(original)
