"""The last check of a diffusion merge (SD1.5, SDXL): every component loads and one denoising
step gives finite values — a smoke test of shapes and finiteness, not of image quality.

- a diffusers pipeline folder: the UNet and the scheduler load with diffusers, one step on a
  small random latent (random text conditioning of the UNet's width; SDXL's pooled text and
  size ids too) goes through ``scheduler.step``; the VAE decodes the stepped latent and encodes
  the image back; each text encoder runs on a few token ids.
- a single file (original LDM layout): there are no configs, so the UNet's and the VAE's are
  read from the tensor shapes (:func:`unet_config`, :func:`vae_config`), the tensors are
  renamed to diffusers' names and loaded strictly, and the same step and decode run; the text
  encoders' tensors are checked finite one by one.

One component is in memory at a time. Every failure is one :class:`MergeError` sentence naming
the component and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from merge_engine.errors import MergeError
from merge_engine.sources.formats.layouts import component_of
from merge_engine.sources.formats.sd_names import Family, Renamed, convert_names
from merge_engine.sources.model_building import building_model
from merge_engine.sources.tensors import TensorInfo, read_header

Shape = tuple[int, ...]

LATENT_SIZE = 8  # latent pixels a side (64 image pixels): enough for every level, small
TOKENS = 5  # text positions of the random conditioning, and token ids fed to text encoders
STEPS = 10  # the schedule the one step is taken from (its first, noisiest, timestep)
SEED = 0

# SD's published schedulers, for a single file (which carries no scheduler config).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "sd1": (
        "DDIMScheduler",
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
    ),
    "sdxl": (
        "EulerDiscreteScheduler",
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
    ),
}
VAE_SCALING = {"sd1": 0.18215, "sdxl": 0.13025}  # not in the shapes: SD's published factors
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
LOADABLE_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
FIX_LOAD = (
    "check that the recipe's models are all of one family (all SD1.5 or all SDXL) and that "
    "discard keeps the component whole"
)
FIX_VALUES = "check the recipe's weights (or use float32)"


# --- what the failures say -------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:300]}"


@contextmanager
def _loading(what: str, library: str = "diffusers") -> Iterator[None]:
    try:
        yield
    except MergeError:
        raise
    except Exception as error:  # noqa: BLE001  (any failure to load is the same verdict)
        raise MergeError(
            f"the merged {what} does not load with {library} ({_first_line(error)}); {FIX_LOAD}"
        ) from None


def _complete(loaded: tuple) -> torch.nn.Module:
    """The model of ``from_pretrained(..., output_loading_info=True)``, refused when a tensor
    it needs was missing or of another shape (both libraries would fill it at random and go
    on); tensors it does not use (an old ``position_ids``) are let be."""
    model, info = loaded
    for kind in ("missing_keys", "mismatched_keys"):
        if names := sorted(map(str, info.get(kind) or ())):
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ValueError(f"{kind.replace('_', ' ')}: {', '.join(names[:3])}{more}")
    return model


@contextmanager
def _running(what: str, on: str) -> Iterator[None]:
    try:
        with torch.no_grad():
            yield
    except MergeError:
        raise
    except Exception as error:  # noqa: BLE001
        raise MergeError(
            f"the merged {what} fails on {on} ({_first_line(error)}); {FIX_LOAD}"
        ) from None


def _finite(values: torch.Tensor, what: str, on: str, fix: str = FIX_VALUES) -> None:
    if not torch.isfinite(values).all():
        raise MergeError(f"the merged {what} gives NaN or infinite outputs on {on}; {fix}")


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the runs, the same for both layouts -----------------------------------------------------


def _randn(generator: torch.Generator, *shape: int, like: torch.nn.Module) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


def denoise_once(unet, scheduler, device: torch.device) -> torch.Tensor:
    """One step of ``scheduler`` with ``unet`` from a small random latent; the stepped latent."""
    config = unet.config
    generator = torch.Generator().manual_seed(SEED)
    # the smallest latent every downsampling level can halve, at most LATENT_SIZE if possible
    levels = 2 ** (len(config.block_out_channels) - 1)
    size = max(levels, min(LATENT_SIZE, int(config.sample_size or LATENT_SIZE)))
    size = math.ceil(size / levels) * levels
    with _running("UNet", "a test latent"):
        scheduler.set_timesteps(STEPS, device=device)
        t = scheduler.timesteps[0]
        latent = _randn(generator, 1, config.in_channels, size, size, like=unet)
        latent = latent * scheduler.init_noise_sigma
        text = _randn(generator, 1, TOKENS, config.cross_attention_dim, like=unet)
        extra = {}
        if config.addition_embed_type == "text_time":  # SDXL: pooled text, sizes and crop
            pooled = (
                config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            )
            pixels = 8 * size
            ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=unet.dtype)
            extra["added_cond_kwargs"] = {
                "text_embeds": _randn(generator, 1, pooled, like=unet),
                "time_ids": ids.to(device),
            }
        noise = unet(
            scheduler.scale_model_input(latent, t), t, encoder_hidden_states=text, **extra
        ).sample
        _finite(noise, "UNet", "a test latent")
        stepped = scheduler.step(noise, t, latent).prev_sample
    _finite(stepped, "UNet", f"a {type(scheduler).__name__} step")
    return stepped


def decode_and_encode(vae, latent: torch.Tensor) -> None:
    """The VAE decodes ``latent`` and encodes the image back, finite both ways."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = vae.to(torch.float32)  # as diffusers' pipelines decode a VAE whose config asks it
    latent = latent.to(vae.device, vae.dtype) / vae.config.scaling_factor
    fix = "check the recipe's weights and its vae (or use float32)"
    with _running("VAE", "the stepped test latent"):
        image = vae.decode(latent).sample
        _finite(image, "VAE", "decoding a test latent", fix)
        encoded = vae.encode(image.clamp(-1, 1)).latent_dist.mean
    _finite(encoded, "VAE", "encoding a test image", fix)


def run_text_encoder(model, name: str) -> None:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or TOKENS + 1
    ids = torch.tensor([[(i + 1) % vocab for i in range(TOKENS)]], device=model.device)
    with _running(f"text encoder ({name})", "test tokens"):
        output = model(input_ids=ids)
    for value in output.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            _finite(value, f"text encoder ({name})", "test tokens")


# --- a diffusers pipeline folder -------------------------------------------------------------


def _has_weights(component: Path) -> bool:
    return component.is_dir() and any(component.glob("*.safetensors"))


def _stored_dtype(component: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor of the component's weights."""
    for path in sorted(component.glob("*.safetensors")):
        for info in read_header(path).values():
            if info.dtype.is_floating_point:
                return info.dtype
    return torch.float32


def _class_in(module, name: str, base: type) -> type:
    """``module.name`` when it is a subclass of ``base`` (a known library class, no remote code)."""
    found = getattr(module, str(name), None)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(f"{name!r} is not a {base.__name__} class of {module.__name__}")
    return found


def _component_model(model_class, folder: Path, name: str, device: torch.device):
    """A diffusers model of the pipeline, in the dtype its weights are stored in, complete."""
    with building_model():
        loaded = model_class.from_pretrained(
            folder,
            subfolder=name,
            torch_dtype=_stored_dtype(folder / name),
            output_loading_info=True,
        )
    return _complete(loaded).to(device).eval()


def verify_pipeline(folder: Path, device: torch.device) -> None:
    """A diffusers pipeline folder: UNet + scheduler step, VAE, text encoders, one at a time."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if not _has_weights(folder / "unet"):
        raise MergeError(
            f"the merged pipeline has no UNet weights in {folder.name}/unet; {FIX_LOAD}"
        )
    with _loading("UNet"):
        unet = _component_model(UNet2DConditionModel, folder, "unet", device)
    with _loading("scheduler"):
        scheduler_class = _class_in(
            diffusers, index.get("scheduler", [None, None])[1], SchedulerMixin
        )
        scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    latent = denoise_once(unet, scheduler, device)
    del unet
    _free(device)
    if _has_weights(folder / "vae"):
        with _loading("VAE"):
            vae = _component_model(AutoencoderKL, folder, "vae", device)
        decode_and_encode(vae, latent)
        del vae
        _free(device)
    for name in TEXT_ENCODERS:
        if not _has_weights(folder / name):
            continue
        with _loading(f"text encoder ({name})", "transformers"):
            library, class_name = index.get(name, [None, None])
            if library != "transformers" or class_name not in LOADABLE_TEXT_ENCODERS:
                raise ValueError(f"model_index.json names {library}.{class_name} for {name}")
            model_class = getattr(transformers, class_name)
            with building_model():
                loaded = model_class.from_pretrained(
                    folder,
                    subfolder=name,
                    dtype="auto",
                    trust_remote_code=False,
                    output_loading_info=True,
                )
            model = _complete(loaded).to(device)
            model.eval()
        run_text_encoder(model, name)
        del model
        _free(device)


# --- configs from tensor shapes (a single file has none) --------------------------------------


def _numbers(pattern: str, shapes: Mapping[str, Shape]) -> list[int]:
    """The numbers ``pattern``'s one group captures at the start of the names, sorted."""
    return sorted({int(m[1]) for m in (re.match(pattern, n) for n in shapes) if m})


def _count(pattern: str, shapes: Mapping[str, Shape]) -> int:
    found = _numbers(pattern, shapes)
    return found[-1] + 1 if found else 0


def _groups(channels: list[int]) -> int:
    """GroupNorm groups (not in the shapes): SD's 32 when every width allows it, else the
    largest count up to 32 that divides every width (sums of widths too, as up blocks see)."""
    common = math.gcd(*channels)
    return max(g for g in range(1, 33) if common % g == 0)


def _heads(width: int) -> int:
    """Attention heads (not in the shapes): 64-wide heads where the width allows (SDXL's;
    SD1.5's 8 heads differ only in how q·k is split, never in a shape), else the most heads up
    to 8 that divide it."""
    if width % 64 == 0:
        return width // 64
    return max(h for h in range(1, 9) if width % h == 0)


def unet_config(shapes: Mapping[str, Shape], pooled_text: int | None = None) -> dict:
    """A ``UNet2DConditionModel`` config from diffusers-named UNet tensor shapes.

    From the shapes: in/out channels (conv_in, conv_out), levels and their widths (each down
    level's first resnet conv1), resnets per level, which levels have attention (down and up
    separately), transformer depth per level (transformer_blocks of the level's first
    attention; 1 on a level without, but the mid block's depth on the last level, whose depth
    diffusers gives the mid block), the text width (attn2.to_k's input),
    linear or 1x1-conv projections (proj_in's rank), the time embedding width, and SDXL's
    addition embedding input (add_embedding.linear_1's input). Not in the shapes: heads and
    norm groups (:func:`_heads`, :func:`_groups`), and how SDXL's addition input splits into
    pooled text and 6 size ids: ``pooled_text`` (text_encoder_2's projection width) when
    known, else SDXL's 256 per id (or less, on a UNet too small for it).
    """
    levels = _count(r"down_blocks\.(\d+)\.", shapes)
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]

    def depth(prefix: str) -> int:
        return _count(rf"{re.escape(prefix)}\.attentions\.0\.transformer_blocks\.(\d+)\.", shapes)

    mid = depth("mid_block")
    down = [depth(f"down_blocks.{i}") for i in range(levels)]
    up = [depth(f"up_blocks.{i}") for i in range(levels)]
    projection = next(s for n, s in shapes.items() if n.endswith("attentions.0.proj_in.weight"))
    text_width = next(s[1] for n, s in shapes.items() if n.endswith("attn2.to_k.weight"))
    config = {
        "sample_size": LATENT_SIZE,
        "in_channels": shapes["conv_in.weight"][1],
        "out_channels": shapes["conv_out.weight"][0],
        "down_block_types": tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down),
        "up_block_types": tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid else None,
        "block_out_channels": tuple(widths),
        "layers_per_block": _count(r"down_blocks\.0\.resnets\.(\d+)\.", shapes),
        "transformer_layers_per_block": tuple(
            d or up[levels - 1 - i] or (mid if i == levels - 1 else 1) for i, d in enumerate(down)
        ),
        "cross_attention_dim": text_width,
        "use_linear_projection": len(projection) == 2,
        "attention_head_dim": tuple(_heads(w) for w in widths),
        "norm_num_groups": _groups(widths),
        "time_embedding_dim": shapes["time_embedding.linear_1.weight"][0],
    }
    if "add_embedding.linear_1.weight" in shapes:  # SDXL
        total = shapes["add_embedding.linear_1.weight"][1]
        # SDXL's 256 per id where it fits, else the widest even one that leaves pooled text
        per_id = (total - pooled_text) // 6 if pooled_text else min(256, (total - 1) // 12 * 2)
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": per_id,
            "projection_class_embeddings_input_dim": total,
        }
    return config


def vae_config(shapes: Mapping[str, Shape], family: Family) -> dict:
    """An ``AutoencoderKL`` config from diffusers-named VAE tensor shapes: image and latent
    channels (conv_in, conv_out, decoder.conv_in), levels and widths (each encoder level's
    first resnet conv1), resnets per level, mid-block attention, quant convs; norm groups by
    :func:`_groups`, the latent scaling by family (SD's published factors)."""
    levels = _count(r"encoder\.down_blocks\.(\d+)\.", shapes)
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(widths),
        "layers_per_block": _count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", shapes),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": _groups(widths),
        "scaling_factor": VAE_SCALING[family],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": any(
            n.startswith("encoder.mid_block.attentions.") for n in shapes
        ),
    }


# --- a single file -----------------------------------------------------------------------------


class _Reader:
    """Tensors of a few safetensors files, opened once, read one at a time."""

    def __init__(self, folder: Path, infos: Mapping[str, TensorInfo], stack: ExitStack):
        self.infos = infos
        files = sorted({info.file for info in infos.values()})
        self.handles = {f: stack.enter_context(safe_open(folder / f, "pt")) for f in files}

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.infos[name].file].get_tensor(name)


def _component(targets: list[Renamed], name: str) -> list[Renamed]:
    return [r for r in targets if r.name.startswith(f"{name}/")]


def _build(model_class, config: dict, renames: list[Renamed], read: Callable, device):
    """``model_class(**config)`` with the renamed tensors, loaded strictly, on ``device``."""
    prefix = len(renames[0].name.split("/")[0]) + 1
    tensors = {r.name[prefix:]: r.apply([read(p) for p in r.parts]) for r in renames}
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    with torch.device("meta"):  # no memory until the tensors are assigned
        model = model_class(**config)
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"{model_class.__name__} has state that no tensor fills")
    return model.to(device).eval()


def verify_single_file(
    folder: Path, infos: Mapping[str, TensorInfo], family: Family, device: torch.device
) -> None:
    """A single-file SD1.5/SDXL checkpoint: UNet step and VAE from configs read off the shapes,
    the text encoders' tensors finite."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shapes = {name: info.shape for name, info in infos.items()}
    with _loading("UNet"):
        targets, _ = convert_names(family, shapes, to="diffusers")
    unet_renames = _component(targets, "unet")
    if not unet_renames:
        raise MergeError(f"the merged checkpoint in {folder.name} has no UNet tensors; {FIX_LOAD}")
    pooled = next(
        (r.shape[0] for r in targets if r.name == "text_encoder_2/text_projection.weight"), None
    )
    with ExitStack() as stack:
        reader = _Reader(folder, infos, stack)
        with _loading("UNet"):
            config = unet_config({r.name[5:]: r.shape for r in unet_renames}, pooled)
            unet = _build(UNet2DConditionModel, config, unet_renames, reader.get, device)
            class_name, scheduler_config = SCHEDULERS[family]
            scheduler = getattr(diffusers, class_name).from_config(scheduler_config)
        latent = denoise_once(unet, scheduler, device)
        del unet
        _free(device)
        if vae_renames := _component(targets, "vae"):
            with _loading("VAE"):
                config = vae_config({r.name[4:]: r.shape for r in vae_renames}, family)
                vae = _build(AutoencoderKL, config, vae_renames, reader.get, device)
            decode_and_encode(vae, latent)
            del vae
            _free(device)
        for name in sorted(infos):  # the text encoders: every tensor finite, one at a time
            component = component_of(name)
            if component in TEXT_ENCODERS:
                value = reader.get(name)
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise MergeError(
                        f"the merged text encoder ({component}) holds NaN or infinite values "
                        f"in {name}; {FIX_VALUES}"
                    )
