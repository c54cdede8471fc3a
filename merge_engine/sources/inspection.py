"""From a model reference to what the merge needs to know about it: its layout, the config,
every tensor's name, shape and dtype, and the pinned revision; then, only when merging, the files.

Inspection reads file names, ``config.json`` (or diffusers' ``model_index.json``) and
safetensors headers only (locally, or through ``huggingface_hub`` for Hub repos), which is what
lets ``mergebot validate`` answer in seconds. :mod:`merge_engine.sources.formats.layouts` says which
layout the names and headers show.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merge_engine.errors import SourceError, UnsafeCheckpointError
from merge_engine.recipe.hub_names import check_repo_id, check_revision
from merge_engine.recipe.schema import ModelReference
from merge_engine.sources.formats import peft_adapter
from merge_engine.sources.formats.layouts import (
    COMPONENTS,
    STATE_DICT,
    TRANSFORMERS,
    WEIGHT_STEMS,
    Layout,
    component_tensor_name,
    pipeline_family,
    single_file_layout,
)
from merge_engine.sources.hub_failures import read_failed
from merge_engine.sources.hub_reading import hub_errors, hub_header, hub_infos
from merge_engine.sources.low_rank import AdaptedStore
from merge_engine.sources.tensors import (
    INDEX_NAME,
    MemoryStore,
    RenamedStore,
    SafetensorsStore,
    TensorInfo,
    TensorStore,
    read_header,
)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = SIDE_FILES[2:]


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_SUFFIX = "ForSequenceClassification"


def model_task(config: dict[str, Any]) -> str | None:
    """``causal_lm`` or ``classification`` from a config's architectures; None otherwise."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith(CAUSAL_LM_SUFFIXES):
        return "causal_lm"
    if architecture.endswith(CLASSIFIER_SUFFIX):
        return "classification"
    return None


def model_class(config: dict[str, Any]) -> Any:
    """The transformers auto class that loads a checkpoint of this config: a sequence
    classifier when its architectures say so, else a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if model_task(config) == "classification":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


@dataclass
class ModelSource:
    """One input model as the planner sees it: metadata only, plus a way to open its tensors."""

    ref: ModelReference
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    revision: str | None = None
    """The resolved commit SHA of a Hub repo; None for a local folder or an in-memory model."""
    folder: Path | None = None
    """Where the files are on disk: a local folder, or the download of a Hub repo."""
    memory: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    layout: Layout = TRANSFORMERS
    origin: ModelSource | None = field(default=None, repr=False)
    """For part of another model seen under other names (a VAE to bake): that model."""
    renames: Mapping[str, Any] | None = field(default=None, repr=False)
    """How each tensor is made from ``origin_tensors`` when the names map across layouts."""
    origin_tensors: Mapping[str, TensorInfo] | None = field(default=None, repr=False)
    has_tokenizer: bool | None = None
    """Whether the folder or repo holds tokenizer files (None: not looked at)."""
    adapter: peft_adapter.PeftAdapter | None = field(default=None, repr=False)
    """For ``base+adapter``: the adapter read (its reference, pinned revision, kind, folder),
    applied by :meth:`store` as the tensors stream; ``tensors`` and ``revision`` are the
    base's, whose names and shapes the adapter keeps."""

    @property
    def num_layers(self) -> int | None:
        for key in LAYER_COUNT_KEYS:
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None

    def revisions(self) -> dict[ModelReference, str]:
        """The commit each Hub part of the reference was read at, keyed by plain reference
        (what :meth:`ModelReference.with_revisions` pins)."""
        pinned = {self.ref.base: self.revision} if self.revision else {}
        if self.adapter is not None and self.adapter.revision:
            pinned[self.adapter.ref] = self.adapter.revision
        return pinned

    def store(self) -> TensorStore:
        """The model's tensors, one at a time, with its adapter applied if it has one."""
        store = self._base_store()
        if self.adapter is None:
            return store
        adapter = self.adapter.store()
        return AdaptedStore(store, self.adapter.deltas(adapter), self.adapter.replacements(adapter))

    def apply_adapter(self, module: torch.nn.Module) -> None:
        """For ``base+adapter``: a module loaded from the base's folder gets the adapted
        tensors, copied in one at a time (nothing happens without an adapter)."""
        if self.adapter is None:
            return
        state, adapted = module.state_dict(), self.store()
        with torch.no_grad():
            for name in self.tensors:
                if name in state:
                    state[name].copy_(adapted.get(name))

    def _base_store(self) -> TensorStore:
        if self.memory is not None:
            return MemoryStore(self.memory)
        folder = self.origin.folder if self.origin else self.folder
        if folder is None:
            raise RuntimeError(f"internal error: {self.ref} was not downloaded before merging")
        if self.renames is not None:
            return RenamedStore(SafetensorsStore(folder, self.origin_tensors), self.renames)
        return SafetensorsStore(folder, self.tensors)


def config_layout(config: dict[str, Any]) -> Layout:
    """A transformers model, or a diffusers component (``_class_name``: a VAE, a UNet),
    which is merged by tensor name like a bare state dict and keeps its config."""
    return STATE_DICT if "_class_name" in config else TRANSFORMERS


def _local_safetensors(folder: Path, origin: str) -> dict[str, TensorInfo]:
    index = folder / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        if not (folder / name).is_file():
            raise SourceError(
                f"{origin} lists shard {name} in its index, but the file is missing; re-download the model"
            )
        tensors.update(read_header(folder / name))
    return tensors


def _load_pickles(folder: Path) -> dict[str, torch.Tensor]:
    """Pickle weights, loaded with ``weights_only=True`` (no code runs) and memory-mapped."""
    index = folder / "pytorch_model.bin.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["pytorch_model.bin"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def pipeline_files(
    files: set[str], read_json: Any, family: str, origin: str
) -> dict[str, list[str]]:
    """Each weight-bearing component's safetensors files in a diffusers pipeline, from the
    repo's file names (``read_json`` reads a shard index): the full-precision files, else
    the float16 variant."""
    found: dict[str, list[str]] = {}
    for component in COMPONENTS[family]:
        for stem, variant in itertools.product(WEIGHT_STEMS, ("", ".fp16")):
            base = f"{component}/{stem}{variant}.safetensors"
            if f"{base}.index.json" in files:
                shards = read_json(f"{base}.index.json")["weight_map"].values()
                found[component] = sorted({f"{component}/{s}" for s in shards})
                break
            if base in files:
                found[component] = [base]
                break
        else:
            raise SourceError(
                f"{origin} has no safetensors weights for its {component}; mergebot reads "
                f"{component}/diffusion_pytorch_model.safetensors or {component}/model.safetensors"
            )
    return found


def _local_pipeline(ref: ModelReference, folder: Path) -> ModelSource:
    index = _read_json(folder / "model_index.json", ref.path)
    family = pipeline_family(index, ref.path)
    files = {str(p.relative_to(folder)) for p in folder.glob("*/*") if p.is_file()}
    tensors: dict[str, TensorInfo] = {}
    for component, names in pipeline_files(
        files, lambda name: _read_json(folder / name, ref.path), family, ref.path
    ).items():
        for name in names:
            tensors.update(_component_tensors(component, read_header(folder / name, name)))
    return ModelSource(ref, index, tensors, folder=folder, layout=Layout(family, "diffusers"))


def _component_tensors(component: str, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """A diffusers component's tensors as the model names them (the file's key kept)."""
    return {component_tensor_name(component, k): replace(i, key=k) for k, i in infos.items()}


def _read_json(path: Path, origin: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise SourceError(
            f"{path.name} of {origin} is not valid JSON; fix or re-download it"
        ) from None


def inspect_local(ref: ModelReference, allow_pickle: bool = False) -> ModelSource:
    path = Path(ref.path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":  # a single-file checkpoint
        tensors = read_header(path)
        return ModelSource(
            ref, {}, tensors, folder=path.parent, layout=single_file_layout(tensors, ref.path)
        )
    folder = path
    if not folder.is_dir():
        raise SourceError(
            f"model folder {ref.path} does not exist; check the path, or write org/name for a Hub model"
        )
    if (folder / "model_index.json").is_file():
        return _local_pipeline(ref, folder)
    has_config = (folder / "config.json").is_file()
    if not has_config and peft_adapter.is_adapter_folder(folder):
        raise SourceError(_adapter_as_model(ref))
    config = _read_json(folder / "config.json", ref.path) if has_config else {}
    tensors = _local_safetensors(folder, ref.path)
    if tensors:
        layout = config_layout(config) if has_config else single_file_layout(tensors, ref.path)
        return ModelSource(
            ref,
            config,
            tensors,
            folder=folder,
            layout=layout,
            has_tokenizer=has_tokenizer_files(folder),
        )
    if not has_config or not any((folder / name).exists() for name in PICKLE_NAMES):
        raise SourceError(
            f"{ref.path} holds no *.safetensors weights; save the model with save_pretrained(safe_serialization=True)"
        )
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{ref.path} has only pickle weights (pytorch_model.bin); convert them to safetensors, "
            "or pass --allow-pickle to load them with torch.load(weights_only=True)"
        )
    memory = _load_pickles(folder)
    infos = {
        name: TensorInfo(tuple(t.shape), t.dtype, "pytorch_model.bin") for name, t in memory.items()
    }
    return ModelSource(
        ref, config, infos, folder=folder, memory=memory, has_tokenizer=has_tokenizer_files(folder)
    )


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds any of the files a tokenizer is loaded from."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def inspect_hub(
    ref: ModelReference, token: str | bool | None = None, cache_dir: Path | None = None
) -> ModelSource:
    """Resolve the revision to a commit, list the repo's files, then read the small files
    that say what the model is (``config.json``, ``model_index.json``) and the safetensors
    headers; ``cache_dir`` replaces the shared Hugging Face cache for those small files."""
    check_repo_id(ref.path, "model")  # parsing checked Hub-like names; hub_only sends any here
    if ref.revision is not None:
        check_revision(ref.revision)
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)

    def read_json(file: str) -> dict[str, Any]:
        path = hf_hub_download(ref.path, file, revision=sha, token=token, cache_dir=cache_dir)
        return _read_json(Path(path), ref.path)

    with hub_errors(ref):
        info = api.model_info(ref.path, revision=ref.revision)
        sha = info.sha
        files = {sibling.rfilename for sibling in info.siblings or []}
        if "model_index.json" in files:
            index = read_json("model_index.json")
            family = pipeline_family(index, ref.path)
            tensors: dict[str, TensorInfo] = {}
            for component, names in pipeline_files(files, read_json, family, ref.path).items():
                for name in names:
                    tensors.update(_component_tensors(component, hub_header(api, ref, sha, name)))
            return ModelSource(
                ref, index, tensors, revision=sha, layout=Layout(family, "diffusers")
            )
        if "config.json" not in files and peft_adapter.CONFIG_NAME in files:
            raise SourceError(_adapter_as_model(ref))
        weights = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
        if "config.json" not in files and INDEX_NAME not in files and len(weights) > 1:
            raise SourceError(
                f"{ref.path} holds {len(weights)} single-file checkpoints ({', '.join(weights[:3])}); "
                "mergebot reads one checkpoint per repo: name a repo that holds one, or a local file"
            )
        if "config.json" not in files and len(weights) == 1:  # a single-file checkpoint
            tensors = hub_header(api, ref, sha, weights[0])
            layout = single_file_layout(tensors, ref.path)
            return ModelSource(ref, {}, tensors, revision=sha, layout=layout)
        metadata = api.get_safetensors_metadata(ref.path, revision=sha)
        config = read_json("config.json") if "config.json" in files else {}
    tensors = {}
    for file, file_meta in metadata.files_metadata.items():
        tensors.update(hub_infos(file_meta, ref, sha, file))
    layout = config_layout(config) if config else single_file_layout(tensors, ref.path)
    has_tokenizer = not files.isdisjoint(TOKENIZER_FILES)
    return ModelSource(
        ref, config, tensors, revision=sha, layout=layout, has_tokenizer=has_tokenizer
    )


def _adapter_as_model(ref: ModelReference) -> str:
    return (
        f"{ref} is a PEFT adapter, not a model; apply it to its base model as "
        f"base+adapter (for example org/base+{ref})"
    )


def inspect_model(
    ref: ModelReference,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> ModelSource:
    """A local folder or a Hub repo; with ``hub_only`` always the Hub, whatever folders exist
    here (the service: a request must never read the server's own files). ``base+adapter``:
    the base with the adapter checked against it (:func:`inspect_adapted`)."""
    if ref.adapter is not None:
        return inspect_adapted(ref, token, allow_pickle, hub_only, cache_dir)
    if ref.is_local and not hub_only:
        return inspect_local(ref, allow_pickle)
    return inspect_hub(ref, token, cache_dir)


def inspect_adapted(
    ref: ModelReference,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> ModelSource:
    """``base+adapter`` from headers and configs alone: the base inspected, the adapter read,
    and every tensor the adapter changes or replaces checked to exist in the base with a
    fitting shape."""
    assert ref.adapter is not None
    base = inspect_model(ref.base, token, allow_pickle, hub_only, cache_dir)
    adapter = peft_adapter.read_adapter(ref.adapter, token, hub_only, cache_dir)
    if base.layout.is_diffusion:
        raise SourceError(
            f"{ref.base} is a Stable Diffusion checkpoint and {ref.adapter} a PEFT adapter for "
            "language models, so '+' cannot apply it; name a transformers base model, or give "
            "a diffusion LoRA in the model's LoRA list"
        )
    fitted = adapter.fitted(base.tensors, str(ref.base))
    return replace(base, ref=ref, adapter=fitted)


def download(
    source: ModelSource,
    token: str | bool | None = None,
    *,
    weights: bool = True,
    tokenizer: bool = False,
    cache_dir: Path | None = None,
) -> None:
    """Fetch, pinned to the resolved commit, only what is needed: the weight files when the
    plan reads this model's tensors, the config, and the tokenizer for the tokenizer donor.
    ``cache_dir`` replaces the shared Hugging Face cache (the service gives each job its own).
    A model's adapter is fetched with it, pinned to the commit it was read at."""
    if source.adapter is not None and weights:
        peft_adapter.download_adapter(source.adapter, token, cache_dir)
    if source.origin is not None:
        download(source.origin, token, weights=weights, cache_dir=cache_dir)
        return
    if source.folder is not None:
        return
    from huggingface_hub import snapshot_download

    patterns = [INDEX_NAME, "config.json", "generation_config.json"]
    if source.layout.format == "diffusers":  # every component's config, tokenizers, scheduler
        patterns += ["*.json", "*.txt"]
    patterns += sorted({info.file for info in source.tensors.values()}) if weights else []
    patterns += list(TOKENIZER_FILES) if tokenizer else []
    try:
        folder = snapshot_download(
            source.ref.path,
            revision=source.revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=cache_dir,
        )
    except Exception as error:  # noqa: BLE001  (network and Hub errors of any client version)
        raise SourceError(read_failed(error, f"{source.ref.path}@{source.revision}")) from None
    source.folder = Path(folder)


def inspect_recipe_models(
    refs: list[ModelReference],
    token: str | bool | None = None,
    allow_pickle: bool = False,
    hub_only: bool = False,
    cache_dir: Path | None = None,
) -> dict[ModelReference, ModelSource]:
    """Metadata of every model a recipe reads, each fetched once."""
    return {ref: inspect_model(ref, token, allow_pickle, hub_only, cache_dir) for ref in refs}
