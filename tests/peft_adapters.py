"""PEFT LoRA adapters for the tests, made and baked by PEFT itself (the independent side of
every comparison with mergebot's adapters)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def save_adapter(base: Path, folder: Path, seed: int = 0, **lora) -> Path:
    """A PEFT LoRA adapter of ``base`` with random (non-zero) A and B, as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it saves the embedding it adapts
        get_peft_model(model, config).save_pretrained(folder)
    return folder


def bake(base: Path, adapter: Path, folder: Path | None = None) -> dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload`` of ``adapter`` into ``base`` (saved to ``folder``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    baked = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if folder is not None:
        baked.save_pretrained(folder, safe_serialization=True)
    return baked.state_dict()
