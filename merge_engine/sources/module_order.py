"""The order in which a transformers model registers its modules, read off its config alone.

A checkpoint's header lists tensors by name (``layers.10`` before ``layers.2``, ``mlp``
before ``self_attn``), but PEFT visits a model's modules in ``named_modules()`` order, and
the order matters wherever random numbers are drawn per module (PEFT's dare masks). The model
is built on the meta device: no weight is allocated or read.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_engine.sources.inspection import model_class
from merge_engine.sources.model_building import building_model


def module_order(config: dict[str, Any]) -> list[str] | None:
    """Every module path of the model ``config`` describes, in registration order; None
    when transformers cannot build it from the config (an unknown or remote-code model)."""
    from transformers import AutoConfig

    try:
        with building_model(), torch.device("meta"):
            model = model_class(config).from_config(AutoConfig.for_model(**config))
    except (ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None
    return [name for name, _ in model.named_modules() if name]
