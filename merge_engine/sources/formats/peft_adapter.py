"""A PEFT LoRA adapter read from ``adapter_config.json`` and the safetensors header of
``adapter_model.safetensors`` alone (a local folder, or a Hub repo through ``huggingface_hub``):
which base tensors it changes, with which tensors (A and B) and scale, and which it replaces
(``modules_to_save``). Only plain LoRA is read; every other PEFT type and LoRA variant (DoRA,
LoHa, LoKr, IA3, AdaLoRA, VeRA, ...) is refused by name. Applying it is
:class:`merge_engine.sources.low_rank.AdaptedStore`'s.

PEFT names an adapter's tensors after the module paths of the model it wraps:
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for an embedding), and a
module it trains whole (``modules_to_save``: a head, a classifier's ``score``) as
``base_model.model.<module>.weight``. The scale of a module is PEFT's: ``lora_alpha / r``
(``/ sqrt(r)`` with rsLoRA), ``r`` and ``lora_alpha`` taken from ``rank_pattern`` and
``alpha_pattern`` when a key matches the module as PEFT matches it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merge_engine.errors import SourceError, UnsafeCheckpointError, excerpt
from merge_engine.recipe.patterns import compile_pattern
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.low_rank import LowRankDelta
from merge_engine.sources.tensors import (
    MAX_TENSOR_NAME_CHARS,
    SafetensorsStore,
    TensorInfo,
    TensorStore,
    read_header,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
"""Far more than any adapter's config (a few kB; a rank pattern per module of a large model
stays under 100 kB)."""
MAX_PATTERN_KEYS = 4096
"""Entries of ``rank_pattern`` or ``alpha_pattern``, each matched against every module."""

_KIND = "PEFT LoRA"
_VARIANTS = {
    "use_dora": "DoRA (use_dora: true)",
    "lora_bias": "LoRA with a trained bias (lora_bias: true)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "LoRA with layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
"""Config fields that, set, make an adapter something other than a plain LoRA."""
_SUFFIXES = {
    ".lora_A.weight": ("down", False),
    ".lora_B.weight": ("up", False),
    ".lora_embedding_A": ("down", True),
    ".lora_embedding_B": ("up", True),
}


@dataclass(frozen=True)
class LoraModule:
    """One base tensor an adapter changes, and how."""

    base_tensor: str
    """The changed tensor's name in the base checkpoint (``<module>.weight``)."""
    up: str
    """B's name in the adapter file."""
    down: str
    """A's name in the adapter file."""
    rank: int
    alpha: float
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    """Known once the base's shapes are (:meth:`PeftAdapter.fitted`)."""

    @property
    def module(self) -> str:
        return self.base_tensor.removesuffix(".weight")


@dataclass
class PeftAdapter:
    """What was read of one PEFT LoRA adapter: headers and config only, until downloaded."""

    ref: ModelReference
    config: dict[str, Any] = field(repr=False)
    tensors: dict[str, TensorInfo] = field(repr=False)
    modules: dict[str, LoraModule] = field(repr=False)
    """Keyed by the base tensor each changes."""
    replaced: dict[str, str] = field(repr=False)
    """Base tensor name → the adapter tensor that replaces it (``modules_to_save``, and an
    embedding PEFT saved whole beside its LoRA)."""
    revision: str | None = None
    """The resolved commit of a Hub adapter; None for a local folder."""
    folder: Path | None = None
    """Where its files are: the local folder, or the download of a Hub adapter."""
    kind: str = _KIND

    @property
    def base_model(self) -> str | None:
        """The base the adapter was trained on, as its config names it (may be absent)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def ranks(self) -> list[int]:
        return sorted({module.rank for module in self.modules.values()})

    def describe(self) -> str:
        """``PEFT LoRA, rank 8, 28 modules`` (and what it replaces whole)."""
        ranks = "/".join(str(rank) for rank in self.ranks) or "0"
        text = f"{self.kind}, rank {ranks}, {len(self.modules)} module{'s' if len(self.modules) != 1 else ''}"
        replaced = sorted(self.replaced)
        if replaced:
            more = f" and {len(replaced) - 3} more" if len(replaced) > 3 else ""
            text += f", replaces {', '.join(replaced[:3])}{more}"
        return text

    def files(self) -> list[str]:
        """The files a download fetches."""
        return [CONFIG_NAME, WEIGHTS_NAME]

    def store(self) -> TensorStore:
        if self.folder is None:
            raise RuntimeError(f"internal error: adapter {self.ref} was not downloaded")
        return SafetensorsStore(self.folder, self.tensors)

    def deltas(self, store: TensorStore) -> dict[str, list[LowRankDelta]]:
        """Each changed base tensor's delta, read from ``store`` (the adapter's tensors)."""
        return {
            name: [
                LowRankDelta(
                    store,
                    module.up,
                    module.down,
                    module.scale,
                    fan_in_fan_out=module.fan_in_fan_out,
                    rounded_first=module.embedding,
                )
            ]
            for name, module in self.modules.items()
        }

    def replacements(self, store: TensorStore) -> dict[str, tuple[TensorStore, str]]:
        return {name: (store, key) for name, key in self.replaced.items()}

    def fitted(self, base: Mapping[str, TensorInfo], base_name: str) -> PeftAdapter:
        """This adapter checked against a base's tensors (every changed or replaced tensor
        exists with a fitting shape), with each module's orientation settled: a GPT-2 style
        ``Conv1D`` weight is stored (in, out), which PEFT handles with ``fan_in_fan_out``
        whatever the config says; a square weight follows the adapter's other modules, else its
        config. SourceError naming the module, both shapes and the fix when one does not fit."""
        fix = self._fix(base_name)
        oriented: dict[str, tuple[bool, ...]] = {}
        for name, module in self.modules.items():
            if name not in base:
                raise SourceError(
                    f"adapter {self.ref} changes {module.module}, which {base_name} does not have; {fix}"
                )
            shape = base[name].shape
            up, down = self.tensors[module.up].shape, self.tensors[module.down].shape
            update = (down[1], up[0]) if module.embedding else (up[0], down[1], *down[2:])
            fits = [flip for flip in (False, True) if _oriented(update, flip) == shape]
            if module.embedding:
                fits = [True] if update == shape else []
            if not fits:
                raise SourceError(
                    f"adapter {self.ref} changes {module.module} with an update of shape "
                    f"{_shape(update)}, but {base_name} has {name} of shape {_shape(shape)}; {fix}"
                )
            oriented[name] = tuple(fits)
        forced = any(
            fits == (True,) for name, fits in oriented.items() if not self.modules[name].embedding
        )
        default = forced or bool(self.config.get("fan_in_fan_out"))
        modules = {
            name: replace(
                module,
                fan_in_fan_out=module.embedding
                or (oriented[name][0] if len(oriented[name]) == 1 else default),
            )
            for name, module in self.modules.items()
        }
        for name, key in self.replaced.items():
            if name not in base:
                raise SourceError(
                    f"adapter {self.ref} replaces {name} (modules_to_save), which {base_name} does not have; {fix}"
                )
            if self.tensors[key].shape != base[name].shape:
                raise SourceError(
                    f"adapter {self.ref} replaces {name} with a tensor of shape "
                    f"{_shape(self.tensors[key].shape)}, but {base_name} has it of shape "
                    f"{_shape(base[name].shape)}; {fix}"
                )
        return replace(self, modules=modules)

    def _fix(self, base_name: str) -> str:
        trained = self.base_model
        if trained and trained != base_name:
            return f"apply it to the model it was trained on ({excerpt(trained)})"
        return "apply it to the model it was trained on"


def _oriented(update: tuple[int, ...], flip: bool) -> tuple[int, ...]:
    return (update[1], update[0]) if flip and len(update) == 2 else update


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def is_adapter_folder(folder: Path) -> bool:
    """Whether a local folder holds a PEFT adapter (its config file)."""
    return (folder / CONFIG_NAME).is_file()


def read_adapter(
    ref: ModelReference,
    token: str | bool | None = None,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> PeftAdapter:
    """A PEFT adapter in a local folder or a Hub repo (``hub_only``: always the Hub, as the
    service reads every reference). Its modules' orientation is settled by :meth:`fitted`."""
    if ref.is_local and not hub_only:
        return read_local_adapter(ref)
    return read_hub_adapter(ref, token, cache_dir)


def read_local_adapter(ref: ModelReference) -> PeftAdapter:
    """A PEFT adapter in a local folder, from its config and header."""
    folder = Path(ref.path).expanduser()
    if not folder.is_dir():
        raise SourceError(
            f"adapter folder {ref.path} does not exist; check the path, or write org/name for a Hub adapter"
        )
    if not (folder / CONFIG_NAME).is_file():
        raise SourceError(
            f"{ref.path} has no {CONFIG_NAME}, so it is not a PEFT adapter; give the folder "
            "that PEFT's save_pretrained wrote"
        )
    if (folder / CONFIG_NAME).stat().st_size > MAX_CONFIG_BYTES:
        raise SourceError(_config_too_big(ref))
    config = parse_config(_json((folder / CONFIG_NAME).read_bytes(), ref), ref)
    if not (folder / WEIGHTS_NAME).is_file():
        raise _no_weights(ref, (folder / PICKLE_NAME).is_file())
    tensors = read_header(folder / WEIGHTS_NAME)
    return adapter_from(ref, config, tensors, folder=folder)


def read_hub_adapter(
    ref: ModelReference, token: str | bool | None = None, cache_dir: Path | None = None
) -> PeftAdapter:
    """A PEFT adapter on the Hub: its revision resolved to a commit, its config downloaded
    (``cache_dir`` replaces the shared cache) and its header read by a range request."""
    from huggingface_hub import HfApi, hf_hub_download

    from merge_engine.recipe.hub_names import check_repo_id, check_revision
    from merge_engine.sources.hub_reading import hub_errors, hub_header

    check_repo_id(ref.path, "model")
    if ref.revision is not None:
        check_revision(ref.revision)
    api = HfApi(token=token)
    with hub_errors(ref):
        info = api.model_info(ref.path, revision=ref.revision, files_metadata=True)
        sha = info.sha
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        if CONFIG_NAME not in sizes:
            raise SourceError(
                f"{ref.path} has no {CONFIG_NAME}, so it is not a PEFT adapter; name the "
                "adapter's repo after '+'"
            )
        if (sizes[CONFIG_NAME] or 0) > MAX_CONFIG_BYTES:
            raise SourceError(_config_too_big(ref))
        path = hf_hub_download(
            ref.path, CONFIG_NAME, revision=sha, token=token, cache_dir=cache_dir
        )
        config = parse_config(_json(Path(path).read_bytes(), ref), ref)
        if WEIGHTS_NAME not in sizes:
            raise _no_weights(ref, PICKLE_NAME in sizes)
        tensors = hub_header(api, ref, sha, WEIGHTS_NAME)
    return adapter_from(ref, config, tensors, revision=sha)


def download_adapter(
    adapter: PeftAdapter, token: str | bool | None = None, cache_dir: Path | None = None
) -> None:
    """Fetch a Hub adapter's files, pinned to the commit read (a local one is in place)."""
    if adapter.folder is not None:
        return
    from huggingface_hub import snapshot_download

    from merge_engine.sources.hub_failures import read_failed

    try:
        folder = snapshot_download(
            adapter.ref.path,
            revision=adapter.revision,
            allow_patterns=adapter.files(),
            token=token,
            cache_dir=cache_dir,
        )
    except Exception as error:  # noqa: BLE001  (network and Hub errors of any client version)
        raise SourceError(read_failed(error, f"{adapter.ref.path}@{adapter.revision}")) from None
    adapter.folder = Path(folder)


def _json(raw: bytes, ref: ModelReference) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise SourceError(
            f"{CONFIG_NAME} of {ref} is not valid JSON; fix or re-save the adapter"
        ) from None


def _config_too_big(ref: ModelReference) -> str:
    return (
        f"{CONFIG_NAME} of {ref} is larger than {MAX_CONFIG_BYTES // 1024:,} kB, far more than "
        "an adapter's config; re-save the adapter with PEFT"
    )


def _no_weights(ref: ModelReference, pickle: bool) -> SourceError:
    if pickle:
        return UnsafeCheckpointError(
            f"adapter {ref} has only pickle weights ({PICKLE_NAME}); re-save it with "
            "save_pretrained(safe_serialization=True) to get adapter_model.safetensors"
        )
    return SourceError(
        f"adapter {ref} has no {WEIGHTS_NAME}; re-save it with PEFT's save_pretrained"
    )


def parse_config(config: Any, ref: ModelReference) -> dict[str, Any]:
    """``adapter_config.json`` checked to be a plain LoRA that mergebot applies."""
    if not isinstance(config, dict):
        raise SourceError(f"{CONFIG_NAME} of {ref} is not a JSON object; re-save the adapter")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise SourceError(
            f"adapter {ref} is a PEFT {excerpt(peft_type)} adapter; mergebot applies LoRA "
            "adapters only (peft_type LORA): bake it into its base with PEFT's merge_and_unload "
            "and name the baked model"
        )
    for key, name in _VARIANTS.items():
        if config.get(key):
            raise SourceError(
                f"adapter {ref} is {name}, which mergebot does not apply; bake it into its "
                "base with PEFT's merge_and_unload and name the baked model, or use a plain LoRA"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not _positive(value):
            raise SourceError(
                f"{CONFIG_NAME} of {ref} has {key} {excerpt(value)}; it must be a positive number"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(_positive(v) for v in patterns.values()):
            raise SourceError(
                f"{CONFIG_NAME} of {ref} has a {key} that is not a mapping of module patterns "
                "to positive numbers; re-save the adapter"
            )
        if len(patterns) > MAX_PATTERN_KEYS:
            raise SourceError(
                f"{CONFIG_NAME} of {ref} has {len(patterns):,} {key} entries, more than the "
                f"{MAX_PATTERN_KEYS:,} mergebot reads; re-save the adapter with fewer"
            )
    return config


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def adapter_from(
    ref: ModelReference,
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    revision: str | None = None,
    folder: Path | None = None,
) -> PeftAdapter:
    """The adapter that a checked config and its file's header describe."""
    parts: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    replaced: dict[str, str] = {}
    for key in tensors:
        if not key.startswith(PREFIX):
            raise SourceError(
                f"adapter {ref} has a tensor {excerpt(key)} that is not named as PEFT names "
                f"them ({PREFIX}...); re-save it with PEFT's save_pretrained"
            )
        name = key.removeprefix(PREFIX)
        for suffix, (role, embedding) in _SUFFIXES.items():
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                parts.setdefault(module, {})[role] = key
                if embedding:
                    embeddings.add(module)
                break
        else:
            if ".lora_" in name:
                raise SourceError(
                    f"adapter {ref} holds {excerpt(key)}, a tensor of a LoRA variant mergebot "
                    "does not apply; bake it into its base with PEFT's merge_and_unload"
                )
            replaced[name.replace(".base_layer.", ".")] = key
    modules: dict[str, LoraModule] = {}
    rank_of = _PatternLookup(config, "rank_pattern", ref)
    alpha_of = _PatternLookup(config, "alpha_pattern", ref)
    for module, found in parts.items():
        if set(found) != {"up", "down"}:
            missing = "lora_A" if "down" not in found else "lora_B"
            raise SourceError(f"adapter {ref} has no {missing} for {module}; re-save the adapter")
        rank = rank_of(module, config["r"])
        alpha = alpha_of(module, config["lora_alpha"])
        embedding = module in embeddings
        up, down = tensors[found["up"]].shape, tensors[found["down"]].shape
        if len(up) < 2 or len(down) < 2 or up[1] != rank or down[0] != rank:
            raise SourceError(
                f"adapter {ref} gives {module} rank {rank} in {CONFIG_NAME}, but its lora_A has "
                f"shape {_shape(down)} and lora_B {_shape(up)}; re-save the adapter"
            )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[f"{module}.weight"] = LoraModule(
            f"{module}.weight", found["up"], found["down"], rank, alpha, scale, embedding
        )
    if not modules:
        raise SourceError(f"adapter {ref} holds no LoRA tensors; re-save it with PEFT")
    return PeftAdapter(ref, config, tensors, modules, replaced, revision, folder)


class _PatternLookup:
    """PEFT's ``get_pattern_key``: the first key that matches the end of a module's name
    (``(.*\\.)?(key)$``), run on RE2 as every pattern from a file is."""

    def __init__(self, config: dict[str, Any], field_name: str, ref: ModelReference):
        self.values: list[tuple[Any, float]] = []
        for key, value in (config.get(field_name) or {}).items():
            try:
                pattern = compile_pattern(rf"^(.*\.)?({key})$", MAX_TENSOR_NAME_CHARS)
            except ValueError as error:
                raise SourceError(
                    f"{CONFIG_NAME} of {ref}: the {field_name} key {excerpt(key)} {error}"
                ) from None
            self.values.append((pattern, value))

    def __call__(self, module: str, default: float) -> Any:
        for pattern, value in self.values:
            if pattern.search(module):
                return value
        return default
