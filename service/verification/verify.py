"""The last check before publishing: the merged folder loads and gives finite outputs.

What is checked is told from the folder alone:

- ``model_index.json``: a diffusers pipeline (SD1.5, SDXL): its UNet takes one denoising step,
  its VAE decodes, its text encoders run (:mod:`service.verification.diffusion`);
- ``config.json``: a transformers model, loaded (no remote code) and run on a few tokens;
- ``pytorch_lora_weights.safetensors`` alone: Stable Diffusion LoRA files merged into one, read
  back as a LoRA (each module's up and down of one rank, no unsupported type) with every
  factor finite;
- ``adapter_config.json``: a PEFT LoRA adapter, read back as a merge would read it (a LoRA,
  every module's A and B of one rank) and its every factor finite (the base is not loaded:
  its shapes were checked against the adapters' in the pre-flight);
- safetensors weights and neither: a single-file SD1.5/SDXL checkpoint (told from the tensor
  names) is built from its shapes and takes the same step; anything else is a bare state dict,
  whose every float tensor must be finite, read one at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from merge_engine.errors import MergeError, SourceError
from merge_engine.output.kohya_lora import LORA_FILE
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.formats import peft_adapter
from merge_engine.sources.formats.kohya_lora import read_lora_modules
from merge_engine.sources.formats.layouts import single_file_layout
from merge_engine.sources.model_building import building_model
from merge_engine.sources.tensors import TensorInfo, read_header
from service.verification.diffusion import verify_pipeline, verify_single_file

PROBE_TOKENS = [1, 2, 3, 4, 5]


def verify_output(folder: Path, device: torch.device) -> None:
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        verify_pipeline(folder, device)
    elif (folder / peft_adapter.CONFIG_NAME).is_file():
        verify_adapter(folder)
    elif (folder / LORA_FILE).is_file() and not (folder / "config.json").is_file():
        verify_lora_file(folder)
    elif not (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        infos = weights_of(folder)
        family = _diffusion_family(infos, folder)
        if family is None:
            verify_state_dict(folder, infos)
        else:
            verify_single_file(folder, infos, family, device)
    else:
        verify_transformers(folder, device)


def weights_of(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's safetensors files (one file or shards), from the headers."""
    infos: dict[str, TensorInfo] = {}
    for path in sorted(folder.glob("*.safetensors")):
        infos |= read_header(path)
    return infos


def _diffusion_family(infos: dict[str, TensorInfo], folder: Path) -> str | None:
    """ "sd1" or "sdxl" for a single-file SD checkpoint, None for a bare state dict."""
    try:
        layout = single_file_layout(infos, str(folder / "model.safetensors"))
    except SourceError:
        # a UNet without the rest (a recipe may discard the VAE or text encoders): its
        # family is in the UNet, SDXL's alone having the addition embedding
        if not any(n.startswith("model.diffusion_model.input_blocks.") for n in infos):
            raise
        sdxl = any(n.startswith("model.diffusion_model.label_emb.") for n in infos)
        return "sdxl" if sdxl else "sd1"
    return layout.family if layout.is_diffusion else None


def verify_adapter(folder: Path) -> None:
    try:
        peft_adapter.read_local_adapter(ModelReference(str(folder)))
    except SourceError as error:
        raise MergeError(f"the merged adapter does not read back as a PEFT LoRA: {error}") from None
    verify_state_dict(folder, weights_of(folder))


def verify_lora_file(folder: Path) -> None:
    infos = read_header(folder / LORA_FILE)
    try:
        read_lora_modules({name: info.shape for name, info in infos.items()}, str(folder))
    except SourceError as error:
        raise MergeError(f"the merged LoRA file does not read back as a LoRA: {error}") from None
    verify_state_dict(folder, infos)


def verify_state_dict(folder: Path, infos: dict[str, TensorInfo]) -> None:
    """Every floating-point tensor is finite, read one at a time."""
    for file in sorted({info.file for info in infos.values()}):
        with safe_open(folder / file, "pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if not infos[name].dtype.is_floating_point:
                    continue
                if not torch.isfinite(weights.get_tensor(name)).all():
                    raise MergeError(
                        f"the merged tensor {name} holds NaN or infinite values; check the recipe's weights and parameters (or use float32)"
                    )


def verify_transformers(folder: Path, device: torch.device) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        architecture = (config.architectures or [""])[0]
        model_class = AutoModelForCausalLM if architecture.endswith("ForCausalLM") else AutoModel
        with building_model():
            model = model_class.from_pretrained(folder, dtype="auto", trust_remote_code=False)
    except Exception as error:  # noqa: BLE001  (any failure to load is the same verdict)
        raise MergeError(
            f"the merged model does not load with transformers ({type(error).__name__}: {error}); check the recipe's models and slices"
        ) from None
    model.to(device).eval()
    vocab = int(getattr(config, "vocab_size", 0) or 0) or len(PROBE_TOKENS) + 1
    ids = torch.tensor([[t % vocab for t in PROBE_TOKENS]], device=device)
    with torch.no_grad():
        output = model(input_ids=ids)
    values = output.logits if getattr(output, "logits", None) is not None else output[0]
    if not torch.isfinite(values).all():
        raise MergeError(
            "the merged model gives NaN or infinite outputs on a test input; check the recipe's weights and parameters (or use float32)"
        )
