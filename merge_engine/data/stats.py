"""The forward-pass side of the methods that need data: one model in memory at a time, hooks
that collect what the merge needs, saved as safetensors so the merge pass stays streaming and
a second merge with other coefficients recomputes nothing.

- ``gram_matrices``: for every ``nn.Linear``, G = XᵀX of its inputs (RegMean), in float64.
- ``fisher_diagonal``: for every parameter, the mean over examples of the squared gradient of
  the example's log-likelihood. ``empirical`` uses the data's labels (the next tokens, for a
  causal LM); ``exact`` samples the labels from the model's own distribution.

A batch is what the model takes: a tensor, an ``(inputs, labels)`` pair for a plain module, or
a dict of keyword arguments for a transformers model (``labels`` for classification).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from merge_engine.errors import MergeError

FisherMode = Literal["empirical", "exact"]


@dataclass(frozen=True)
class Statistic:
    """One tensor's statistic from one model, as a merge kernel receives it."""

    value: torch.Tensor
    model_mean: float = 1.0
    """The mean of this statistic over the whole model (Fisher merging's normalisation)."""
    transposed: bool = False
    """The weight is stored [in, out] (GPT-2's ``Conv1D``), not [out, in]."""


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer that multiplies its input by a weight matrix: ``nn.Linear`` (weight
    [out, in]) and transformers' ``Conv1D`` of GPT-2 (weight [in, out])."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)
    }


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def transposed_weights(model: nn.Module) -> set[str]:
    """The linear weights stored [in, out] (``Conv1D``), which RegMean transposes."""
    return {_weight_name(n) for n, m in linear_layers(model).items() if _is_conv1d(m)}


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _of(model: nn.Module) -> str:
    """`` of <checkpoint>`` for a transformers model loaded from a folder, for progress bars."""
    path = getattr(getattr(model, "config", None), "name_or_path", "")
    return f" of {path}" if path else ""


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, tuple/list or dict of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def token_mask(batch: Any) -> torch.Tensor | None:
    """Which positions of a tokenized batch are real tokens, flattened (padding would count as
    data); None for a batch without an ``attention_mask``."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask.reshape(-1).bool() if mask is not None else None


def run_model(model: nn.Module, batch: Any) -> Any:
    """The model's output on a batch: keyword arguments for a dict (labels left out), the
    inputs of an ``(inputs, labels)`` pair, or the tensor itself."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def gram_matrices(
    model: nn.Module, batches: Iterable[Any], device: str = "cpu", progress: bool = False
) -> dict[str, torch.Tensor]:
    """``{"<linear>.weight": XᵀX}`` over every input row each linear layer sees, padding
    excluded (a dict batch's ``attention_mask``). Products are accumulated in place in the
    input's precision (float32 at least; float64 inputs stay float64); RegMean solves in float64.
    Layers fed the same input (q, k, v; gate, up) share one tensor, so the statistics take
    memory once per distinct input."""
    model = model.to(device).eval()
    grams: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    state: dict[str, Any] = {"mask": None, "last": None, "first_batch": True}

    def hook(name: str):
        def collect(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach()
            last = state["last"]
            state["last"] = (x, name)
            if name in aliases:
                return
            if state["first_batch"] and last is not None and last[0] is x:
                aliases[name] = aliases.get(last[1], last[1])
                return
            rows = x.reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and mask.numel() == rows.shape[0]:
                rows = rows[mask]
            if rows.dtype not in (torch.float32, torch.float64):
                rows = rows.float()
            if name in grams:
                grams[name].addmm_(rows.T, rows)
            else:
                grams[name] = rows.T @ rows

        return collect

    handles = [
        m.register_forward_hook(hook(_weight_name(n))) for n, m in linear_layers(model).items()
    ]
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(
                batches, desc=f"Gram matrices{_of(model)}", unit="batch", disable=not progress
            ):
                batch = to_device(batch, torch.device(device))
                state["mask"] = token_mask(batch)
                run_model(model, batch)
                state["last"], state["first_batch"] = None, False
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise MergeError("the calibration data is empty: give each model at least one batch")
    result = {name: gram.cpu() for name, gram in grams.items()}
    for name, target in aliases.items():
        result[name] = result[target]
    return result


def _examples(batch: Any) -> list[Any]:
    """Split a batch into single examples (per-example gradients)."""
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, dict):
        size = next(iter(batch.values())).shape[0]
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
    x, y = batch
    return [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]


def _log_likelihood(
    model: nn.Module, example: Any, mode: FisherMode, generator: torch.Generator | None
) -> torch.Tensor:
    output = run_model(model, example)
    logits = output.logits if hasattr(output, "logits") else output
    if logits.dim() == 3:  # a causal LM: every next token is a prediction
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        if mode == "exact":
            targets = torch.multinomial(
                logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator
            )
            targets = targets.reshape(logp.shape[:-1])
        else:
            targets = example["input_ids"][:, 1:]
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = example.get("attention_mask") if isinstance(example, dict) else None
        return (picked * mask[:, 1:]).sum() if mask is not None else picked.sum()
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "exact":
        target = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    elif isinstance(example, dict) and "labels" in example:
        target = example["labels"]
    elif isinstance(example, (tuple, list)):
        target = example[1]
    else:
        target = logp.argmax(-1)  # no labels: the model's own prediction
    return logp.gather(-1, target.reshape(-1, 1)).sum()


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    mode: FisherMode = "empirical",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{parameter name: mean over examples of (∂ log p / ∂θ)²}``."""
    model = model.to(device).eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator(device=device).manual_seed(seed) if mode == "exact" else None
    count = 0
    for batch in tqdm(batches, desc=f"Fisher{_of(model)}", unit="batch", disable=not progress):
        for example in _examples(to_device(batch, torch.device(device))):
            model.zero_grad(set_to_none=True)
            _log_likelihood(model, example, mode, generator).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise MergeError("the calibration data is empty: give each model at least one batch")
    return {name: (f / count).cpu() for name, f in fisher.items()}


def save_stats(
    stats: dict[str, torch.Tensor],
    path: str | Path,
    transposed: set[str] | None = None,
    samples: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write statistics as safetensors; a tensor shared by several names is stored once and
    the other names recorded as aliases; ``transposed`` lists the [in, out] weights,
    ``samples`` how many calibration examples they come from; ``dtype`` converts what is
    stored (float32 Gram matrices of a float64 model, for instance)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in stats.items():
        if id(tensor) in stored:
            aliases[name] = stored[id(tensor)]
        else:
            stored[id(tensor)] = name
            tensors[name] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
    metadata = {
        "aliases": json.dumps(aliases),
        "transposed": json.dumps(sorted(transposed or [])),
        "mean": repr(mean_of(tensors.values())),
        "samples": str(samples if samples is not None else ""),
    }
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)  # a killed pass leaves no file that looks complete
    return path


def mean_of(tensors: Iterable[torch.Tensor]) -> float:
    """The mean of every entry of ``tensors`` together (Fisher merging's normalisation), summed
    in float64 without concatenating them."""
    total, count = 0.0, 0
    for tensor in tensors:
        total += float(tensor.sum(dtype=torch.float64))
        count += tensor.numel()
    return total / max(count, 1)


class StatsFile:
    """A statistics file opened lazily: one tensor read (memory-mapped) per request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        metadata = self._file.metadata() or {}
        self.aliases: dict[str, str] = json.loads(metadata.get("aliases", "{}"))
        self.transposed: set[str] = set(json.loads(metadata.get("transposed", "[]")))
        self.mean = float(metadata.get("mean", 1.0))
        self.samples = int(metadata["samples"]) if metadata.get("samples") else None
        self._names = set(self._file.keys())

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self._names

    def get(self, name: str) -> Statistic | None:
        stored = self.aliases.get(name, name)
        if stored not in self._names:
            return None
        return Statistic(self._file.get_tensor(stored), self.mean, name in self.transposed)


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    """Every statistic of a file, aliases resolved."""
    file = StatsFile(path)
    tensors = load_file(str(path))
    return tensors | {name: tensors[target] for name, target in file.aliases.items()}
