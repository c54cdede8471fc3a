"""Tiny Stable Diffusion pipelines for the demo and the tests, built offline from configs with
random weights.

`make_pipeline` builds an SD1.5-shaped or SDXL-shaped diffusers pipeline: the block structure of
the real models (levels, resnets per level, where the attentions are, transformer depths, both
text encoders of SDXL), tiny widths, a byte-level CLIP tokenizer written here. `make_finetune`
makes a "fine-tune" of one (base + noise); `write_single_file` writes a pipeline in the
single-file (LDM / A1111) layout with our own name map.

The ``text_encoder`` keys are written with the ``text_model.`` prefix, as on every diffusers SD
repo on the Hub (transformers 5.6 and later would save ``CLIPTextModel`` without it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from merge_engine.sources.formats.sd_names import Family, convert_names

COMPONENTS = {
    "sd1": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
SDXL_TIME_EMBED = 8  # addition_time_embed_dim: SDXL's 256, tiny


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: the 256 symbols its byte-level BPE starts from."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def _tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (no merges: every byte a token), written to ``folder``."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {f"{c}</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


VOCAB = 514


def _text_config(hidden: int, heads: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="quick_gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _vae() -> AutoencoderKL:
    # SD's VAE (the same for SD1.5 and SDXL): 4 levels, 2 resnets a level, channel changes with
    # shortcut convs, mid-block attention, 4 latent channels; widths 128..512 shrunk to 4..16.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scaled(module: torch.nn.Module, scale: float | None) -> torch.nn.Module:
    if scale is not None:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale)
    return module


def make_pipeline(folder: Path, family: Family, seed: int = 0, scale: float | None = None) -> Path:
    """A tiny SD1.5-shaped (``sd1``) or SDXL-shaped (``sdxl``) pipeline saved in ``folder``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder / "_tokenizer_src", "<|endoftext|>")
    vae = _vae()
    if family == "sd1":
        text_encoder = CLIPTextModel(_text_config(16, 2, 16))
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=2,
            norm_num_groups=4,
            cross_attention_dim=16,
            attention_head_dim=2,
        )
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=_scaled(vae, scale),
            text_encoder=_scaled(text_encoder, scale),
            tokenizer=tokenizer,
            unet=_scaled(unet, scale),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        # Two text encoders of different widths (CLIP-L 768 and OpenCLIP bigG 1280 in SDXL):
        # diffusers' single-file loader tells them apart by width.
        text_encoder = CLIPTextModel(_text_config(16, 2, 16))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(24, 2, 12))
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 2),
            norm_num_groups=4,
            cross_attention_dim=16 + 24,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=12 + 6 * SDXL_TIME_EMBED,
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_scaled(vae, scale),
            text_encoder=_scaled(text_encoder, scale),
            text_encoder_2=_scaled(text_encoder_2, scale),
            tokenizer=tokenizer,
            tokenizer_2=_tokenizer(folder / "_tokenizer_src", "!"),
            unet=_scaled(unet, scale),
            scheduler=scheduler,
        )
    else:
        raise ValueError(f"family must be 'sd1' or 'sdxl', not {family!r}")
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_src")
    _prefix_text_model(folder / "text_encoder")
    return folder


def _weights(component: Path) -> Path:
    (path,) = (p for p in component.glob("*.safetensors"))
    return path


def _prefix_text_model(component: Path) -> None:
    """Rewrite a CLIPTextModel's keys in the Hub's form, ``text_model.``-prefixed."""
    path = _weights(component)
    tensors = load_file(path)
    if all(k.startswith("text_model.") for k in tensors):
        return
    save_file(
        {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
        path,
        {"format": "pt"},
    )


def make_finetune(base: Path, folder: Path, seed: int, noise: float = 0.02) -> Path:
    """A copy of the pipeline ``base`` whose every float weight is base + noise * randn."""
    base, folder = Path(base), Path(folder)
    shutil.copytree(base, folder)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(folder.glob("*/*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        for name in sorted(tensors):
            t = tensors[name]
            if t.is_floating_point():
                tensors[name] = t + noise * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        save_file(tensors, path, metadata)
    return folder


def write_single_file(diffusers_folder: Path, path: Path, family: Family) -> Path:
    """The pipeline's unet, vae and text encoder(s) as one single-file (LDM) safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    for component in COMPONENTS[family]:
        for key, value in load_file(_weights(Path(diffusers_folder) / component)).items():
            tensors[f"{component}/{key}"] = value
    targets, _ = convert_names(
        family, {k: tuple(v.shape) for k, v in tensors.items()}, to="single_file"
    )
    out = {r.name: r.apply([tensors[p] for p in r.parts]).contiguous() for r in targets}
    save_file(out, path, {"format": "pt"})
    return Path(path)
