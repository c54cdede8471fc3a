"""Candidates evaluated in memory: no files per trial, memory flat across trials.

The sources are loaded once, as transformers models on the device. A parameter-space
candidate is merged by the same plan and kernels as ``mergebot merge`` (so the written recipe
reproduces it bit for bit), straight into one preallocated model. A layer-path candidate runs
its path over the loaded layers themselves, without copying a weight: a container of the
first model's class whose layer list holds the chosen layers. It runs in the folded form the
written model has: instead of scaling a layer's input, what the layer writes to the residual
stream is scaled (hooks on its writing projections), so the written weights compute what was
evaluated, to the last rounding. Each slot has its own entry in an attention cache: while a
layer runs in slot k it reads and writes the cache as layer k, so a layer that appears twice
in a path never shares cache entries with itself.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from merge_engine.errors import IncompatibleModelsError
from merge_engine.evolve.genome import LayerRef
from merge_engine.evolve.stopping import StopCheckFunction, never_stop
from merge_engine.plan.planner import build_plan
from merge_engine.recipe.schema import ModelReference, Recipe, parse_recipe
from merge_engine.run.executor import MergeSeries, iter_merged
from merge_engine.sources.inspection import (
    LAYER_COUNT_KEYS,
    ModelSource,
    download,
    inspect_model,
    model_class,
)
from merge_engine.sources.model_building import building_model

WRITES_TO_RESIDUAL = ("o_proj", "down_proj")
"""The projections of a pre-norm decoder layer that write into the residual stream."""


@dataclass
class LoadedSource:
    """One source model in memory: its metadata (tensors served from memory) and its module."""

    source: ModelSource
    module: nn.Module

    @property
    def ref(self) -> ModelReference:
        return self.source.ref


def _stored_dtype(source: ModelSource) -> torch.dtype:
    floating = [info.dtype for info in source.tensors.values() if info.dtype.is_floating_point]
    return floating[0] if floating else torch.float32


def load_source(
    ref: ModelReference,
    device: torch.device,
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> LoadedSource:
    """Inspect, download (Hub) and load one model in the dtype it is stored in."""
    source = inspect_model(ref, token, hub_only=hub_only, cache_dir=cache_dir)
    download(source, token, weights=True, tokenizer=True, cache_dir=cache_dir)
    with building_model():
        module = model_class(source.config).from_pretrained(
            source.folder, dtype=_stored_dtype(source), trust_remote_code=False
        )
    source.apply_adapter(module)
    module.to(device).eval()
    state = module.state_dict()
    memory = {name: state[name] for name in source.tensors if name in state}
    missing = sorted(set(source.tensors) - set(memory))
    if missing:
        raise IncompatibleModelsError(
            f"{ref} stores {missing[0]}, which its transformers class does not have; check its config.json"
        )
    in_memory = ModelSource(
        ref, source.config, source.tensors, source.revision, source.folder, memory
    )
    return LoadedSource(in_memory, module)


COMPILE_FROM = 10_000_000
"""Parameters per model from which a candidate's merge kernels run compiled: compiling takes
some 20 s once per process (less with torch's on-disk cache), and at this size a TIES merge
saves about 0.3 s per trial on a CPU core, so the search has paid it back within its first
hundred trials; below it, eager kernels are about as fast."""


class ParameterCandidate:
    """Merges a recipe of the loaded sources into one preallocated model. ``compiled``: run
    the merge kernels compiled (same bits); default: for models of :data:`COMPILE_FROM`
    parameters or more."""

    def __init__(
        self,
        sources: dict[ModelReference, LoadedSource],
        donor: ModelReference,
        dtype: torch.dtype,
        device: torch.device,
        compiled: bool | None = None,
    ):
        from transformers import AutoConfig

        self.sources = {ref: loaded.source for ref, loaded in sources.items()}
        self.device = device
        config = AutoConfig.for_model(**sources[donor].source.config)
        with building_model():
            self.model = model_class(sources[donor].source.config).from_config(config, dtype=dtype)
        self.model.to(device).eval()
        self.state = self.model.state_dict()
        if compiled is None:
            compiled = sum(t.numel() for t in self.state.values()) >= COMPILE_FROM
        self.series = MergeSeries(compiled)
        """Kept from one candidate to the next: the sources do not change within a search."""

    def build(self, recipe: Recipe, check: StopCheckFunction = never_stop) -> nn.Module:
        """The model of ``recipe``, merged into the preallocated weights; ``check()`` is asked
        before each tensor, and may raise to abandon the candidate."""
        plan = build_plan(recipe, self.sources)
        with torch.no_grad():
            for task, tensor in iter_merged(plan, self.device, series=self.series):
                check()
                self.state[task.output].copy_(tensor)
        return self.model


def output_dtype(recipe: Recipe, sources: dict[ModelReference, LoadedSource]) -> torch.dtype:
    """The dtype the merged weights of ``recipe`` have (what the preallocated model holds)."""
    plan = build_plan(recipe, {ref: s.source for ref, s in sources.items()})
    return next((t.out_dtype for t in plan.tasks if not t.copy_only), torch.float32)


def write_scales(path: list[tuple[LayerRef, float]]) -> list[float]:
    """What each slot's writes to the residual stream are multiplied by, so that the path
    needs no scale on any layer's input: 1/(s_1···s_k) for slot k (see :func:`folded_recipe`)."""
    factors, factor = [], 1.0
    for k, (_, scale) in enumerate(path):
        factor = factor / scale if k else factor
        factors.append(factor)
    return factors


class FoldedLayer(nn.Module):
    """A loaded decoder layer (shared, not copied) run as slot ``slot`` of a path: its writes
    to the residual stream are multiplied by ``factor`` (the hooks that :class:`LayerCandidate`
    puts on its writing projections read the factor from the layer), and its modules that
    address an attention cache by ``layer_idx`` (transformers' attention) use the slot's."""

    def __init__(self, layer: nn.Module, factor: float, slot: int):
        super().__init__()
        self.layer = layer
        self.factor = factor
        self.slot = slot
        self._indexed = [
            m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)
        ]
        if hasattr(layer, "attention_type"):  # models with sliding layers pick masks by it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        own = [module.layer_idx for module in self._indexed]
        self.layer.write_factor = self.factor
        for module in self._indexed:
            module.layer_idx = self.slot
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:  # the source model itself stays unchanged
            self.layer.write_factor = 1.0
            for module, index in zip(self._indexed, own, strict=True):
                module.layer_idx = index


def _scale_write(module: nn.Module, inputs: tuple, output: torch.Tensor, layer: nn.Module):
    factor = getattr(layer, "write_factor", 1.0)
    return output if factor == 1.0 else output * factor


def _decoder(module: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model`` in the Llama family)."""
    return module.get_decoder()


def per_layer_config_keys(config: dict) -> list[str]:
    """Config entries holding one value per layer (``layer_types``, ...)."""
    count = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    return [
        k
        for k, v in config.items()
        if isinstance(v, list) and count is not None and len(v) == count
    ]


class LayerCandidate:
    """Runs a layer path over the loaded sources' layers."""

    def __init__(self, sources: list[LoadedSource]):
        self.sources = sources
        self.layers = [list(_decoder(s.module).layers) for s in sources]
        for layers in self.layers:
            for layer in layers:
                for name, module in layer.named_modules():
                    if name.endswith(WRITES_TO_RESIDUAL):
                        module.register_forward_hook(partial(_scale_write, layer=layer))

    def build(self, path: list[tuple[LayerRef, float]]) -> nn.Module:
        """A causal LM computing ``path`` in its folded form, as the written merge computes it:
        embeddings of the first slot's model, each layer's writes scaled by its factor, final
        norm and head of the last slot's (as a passthrough ``slices`` merge lays them out)."""
        from transformers import AutoConfig

        first = self.sources[path[0][0].model]
        last = self.sources[path[-1][0].model]
        data = copy.deepcopy(first.source.config)
        for key in per_layer_config_keys(data):
            data[key] = [self.sources[ref.model].source.config[key][ref.layer] for ref, _ in path]
        for key in LAYER_COUNT_KEYS:
            if key in data:
                data[key] = len(path)
        config = AutoConfig.for_model(**data)
        with building_model(), torch.device("meta"):
            container = model_class(data).from_config(config)
        decoder, first_decoder, last_decoder = (
            _decoder(container),
            _decoder(first.module),
            _decoder(last.module),
        )
        decoder.embed_tokens = first_decoder.embed_tokens
        decoder.rotary_emb = first_decoder.rotary_emb
        decoder.norm = last_decoder.norm
        decoder.layers = nn.ModuleList(
            FoldedLayer(self.layers[ref.model][ref.layer], factor, slot)
            for slot, ((ref, _), factor) in enumerate(zip(path, write_scales(path), strict=True))
        )
        # A tied head is the embedding that the written merge keeps: the first model's.
        container.lm_head = (
            first.module.lm_head if config.tie_word_embeddings else last.module.lm_head
        )
        left = [
            n for n, t in [*container.named_parameters(), *container.named_buffers()] if t.is_meta
        ]
        if left:
            raise IncompatibleModelsError(
                f"a layer path over {first.ref} leaves {left[0]} unset; this model family cannot run a layer path"
            )
        return container.eval()


def folded_recipe(path: list[tuple[LayerRef, float]], refs: list[ModelReference]) -> Recipe:
    """The layer path as a passthrough ``slices`` recipe with its scales folded into weights.

    In a pre-norm block every read of the residual stream goes through an RMSNorm, which
    ignores the scale of its input, and the block writes to the stream only through
    ``o_proj`` and ``down_proj``. Scaling the input of every slot j by s_j therefore equals
    scaling what each slot k writes by its own factor 1/(s_1···s_k) (:func:`write_scales`)
    and leaving the embeddings alone: exact but for the norm's epsilon (x/sqrt(mean(x²)+eps)
    is scale-free only when eps ≪ mean(x²)). See docs/evolve.md.
    """
    slices = []
    for (ref, _), factor in zip(path, write_scales(path), strict=True):
        source = {"model": str(refs[ref.model]), "layer_range": [ref.layer, ref.layer + 1]}
        if factor != 1.0:
            source["parameters"] = {
                "scale": [
                    *({"filter": name, "value": factor} for name in WRITES_TO_RESIDUAL),
                    {"value": 1.0},
                ]
            }
        slices.append({"sources": [source]})
    return parse_recipe({"merge_method": "passthrough", "slices": slices})


def timed(build, *args) -> tuple[nn.Module, float]:
    """``build(*args)`` and the seconds it took."""
    start = time.perf_counter()
    return build(*args), time.perf_counter() - start
