"""The last check before publishing: the merged folder loads with ``transformers`` (no remote
code) and a forward pass over a few tokens gives finite outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from merge_engine.errors import MergeError

PROBE_TOKENS = [1, 2, 3, 4, 5]


def verify_output(folder: Path, device: torch.device) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        architecture = (config.architectures or [""])[0]
        model_class = AutoModelForCausalLM if architecture.endswith("ForCausalLM") else AutoModel
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
