"""Calibration data, from a recipe's ``calibration`` block to batches a model can take.

Three steps, so that the pre-flight stays cheap: :func:`resolve` pins a Hub dataset to a
commit and picks its data file (metadata only) or checks that a local file exists;
:func:`fetch` downloads the pinned file when merging; :func:`batches` reads the rows, checks
the fields, draws ``samples`` of them with ``seed`` and tokenizes them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from merge_engine.errors import RecipeError, SourceError, excerpt
from merge_engine.recipe import quote
from merge_engine.recipe.schema import CALIBRATION_SUFFIXES, Calibration, ModelReference, Recipe
from merge_engine.sources.hub_failures import read_failed
from merge_engine.sources.inspection import ModelSource, has_tokenizer_files, model_class
from merge_engine.sources.model_building import building_model


@dataclass
class CalibrationSource:
    """One calibration block, resolved: where its rows come from, pinned."""

    spec: Calibration
    where: str
    """The recipe field it came from (``calibration`` or ``models[i].calibration``)."""
    revision: str | None = None
    """The commit of a Hub dataset."""
    file: str | None = None
    """The data file: inside the dataset, or the local path."""
    local_file: Path | None = None
    """Where the rows are read from once fetched."""
    samples_used: dict[ModelReference, int | None] = field(default_factory=dict)
    """How many examples each model's statistics came from (after the statistics pass)."""

    def describe(self, endpoint: str = "https://huggingface.co") -> str:
        """One line for the model card; a Hub dataset links to ``endpoint``, where it is."""
        spec = self.spec
        if spec.dataset is not None:
            dataset = spec.dataset.path
            origin = f"dataset [{quote.cell(dataset)}]({endpoint}/datasets/{dataset}) @ `{self.revision}`, file {quote.code(self.file, table=True)}"
        elif spec.path is not None:
            origin = f"local file {quote.code(Path(spec.path).name, table=True)}"
        else:
            origin = f"{len(spec.examples or [])} inline examples"
        label = f", labels {quote.code(spec.label_field, table=True)}" if spec.label_field else ""
        return f"{origin}; text {quote.code(spec.text_field, table=True)}{label}; up to {spec.samples} samples of at most {spec.max_length} tokens, seed {spec.seed}"

    @cached_property
    def fingerprint(self) -> str:
        """What identifies these rows: the content of a local file, the pinned dataset file,
        the inline examples; and every reading option. Hashed once per run, however many
        models share the block."""
        spec = self.spec
        if spec.path is not None:
            data = hashlib.sha256(Path(spec.path).expanduser().read_bytes()).hexdigest()
        elif spec.dataset is not None:
            data = f"{spec.dataset.path}@{self.revision}/{self.file}"
        else:
            data = json.dumps(spec.examples, sort_keys=True)
        options = spec.model_dump(exclude={"path", "dataset", "file", "examples"})
        return hashlib.sha256(json.dumps([data, options], sort_keys=True).encode()).hexdigest()


def resolve(
    spec: Calibration, where: str, token: str | bool | None = None, hub_only: bool = False
) -> CalibrationSource:
    """Pin the block's data without reading it (a dataset's commit and file, a local file's
    existence)."""
    if spec.path is not None:
        if hub_only:
            raise RecipeError(
                "a local calibration file cannot be read here; put the data in a Hub dataset repo or inline 'examples'",
                field=f"{where}.path",
            )
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise SourceError(
                f"calibration file {spec.path} does not exist; check the path in {where}.path"
            )
        return CalibrationSource(spec, where, file=spec.path, local_file=path)
    if spec.dataset is not None:
        revision, file = _resolve_dataset(spec, where, token)
        return CalibrationSource(spec, where, revision=revision, file=file)
    return CalibrationSource(spec, where)


def _resolve_dataset(spec: Calibration, where: str, token: str | bool | None) -> tuple[str, str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    dataset = spec.dataset
    assert dataset is not None
    try:
        info = HfApi(token=token).dataset_info(dataset.path, revision=dataset.revision)
    except GatedRepoError:
        raise SourceError(
            f"dataset {dataset.path} is gated; accept its terms on the Hub and use a token that can read it"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"dataset repo {dataset.path} does not exist on the Hub or is private; check {where}.dataset, or use a token that can read it"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"dataset {dataset.path} has no revision {dataset.revision!r}; use a branch, tag or commit that exists"
        ) from None
    except HfHubHTTPError as error:
        raise SourceError(read_failed(error, f"dataset {dataset}")) from None
    files = [s.rfilename for s in info.siblings or []]
    if spec.file is not None:
        if spec.file not in files:
            raise SourceError(
                f"dataset {dataset.path} has no file {spec.file}; it holds {', '.join(files) or 'no files'}"
            )
        if not spec.file.endswith(CALIBRATION_SUFFIXES):
            raise RecipeError(
                f"{spec.file} must end in {', '.join(CALIBRATION_SUFFIXES)}", field=f"{where}.file"
            )
        return info.sha, spec.file
    data_files = [f for f in files if f.endswith(CALIBRATION_SUFFIXES)]
    if len(data_files) != 1:
        found = ", ".join(data_files) if data_files else "no .txt, .jsonl or .csv file"
        raise RecipeError(
            f"dataset {dataset.path} holds {found}; name the file to read in {where}.file",
            field=f"{where}.file",
        )
    return info.sha, data_files[0]


def fetch(
    source: CalibrationSource, token: str | bool | None = None, cache_dir: Path | None = None
) -> None:
    """Download a Hub dataset's pinned data file (local files and inline examples need nothing)."""
    if source.local_file is not None or source.spec.dataset is None:
        return
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            source.spec.dataset.path,
            source.file,
            repo_type="dataset",
            revision=source.revision,
            token=token,
            cache_dir=cache_dir,
        )
    except Exception as error:  # noqa: BLE001  (network and Hub errors of any client version)
        what = f"{source.file} of dataset {source.spec.dataset.path}@{source.revision}"
        raise SourceError(read_failed(error, what)) from None
    source.local_file = Path(path)


def read_rows(source: CalibrationSource) -> list[dict[str, Any]]:
    """Every row of the block, as dicts, unchecked and in order."""
    spec = source.spec
    if spec.examples is not None:
        return [e if isinstance(e, dict) else {spec.text_field: e} for e in spec.examples]
    path = source.local_file
    assert path is not None, "fetch() the calibration data first"
    text = path.read_text(encoding="utf-8")
    if path.name.endswith(".txt"):
        return [{spec.text_field: line} for line in text.splitlines() if line.strip()]
    if path.name.endswith(".csv"):
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RecipeError(
                f"line {number} of {source.file} is not JSON; a .jsonl file holds one JSON object per line",
                field=source.where,
            ) from None
        if not isinstance(row, dict):
            raise RecipeError(
                f'line {number} of {source.file} is not a JSON object; write {{"{spec.text_field}": ...}} per line',
                field=source.where,
            )
        rows.append(row)
    return rows


def rows(source: CalibrationSource) -> list[dict[str, Any]]:
    """The rows the statistics pass uses: checked for the text (and label) field, then
    ``samples`` of them drawn with ``seed`` (all of them, in order, when there are fewer)."""
    spec = source.spec
    found = read_rows(source)
    if not found:
        raise RecipeError(
            f"the calibration data of {source.where} is empty; give it at least one example",
            field=source.where,
        )
    for field_name, option in ((spec.text_field, "text_field"), (spec.label_field, "label_field")):
        if field_name is None:
            continue
        missing = next((i for i, row in enumerate(found) if field_name not in row), None)
        if missing is not None:
            has = ", ".join(sorted(found[missing])) or "no fields"
            raise RecipeError(
                f"example {missing + 1} has no field '{field_name}' (it has {has}); set {option} to the right field",
                field=f"{source.where}.{option}",
            )
    return draw(found, spec.samples, spec.seed)


def draw(found: list, samples: int | None, seed: int) -> list:
    """``samples`` of the rows drawn with ``seed``, in their order; all of them when fewer."""
    if samples is None or len(found) <= samples:
        return found
    picked = sorted(random.Random(seed).sample(range(len(found)), samples))
    return [found[i] for i in picked]


def batches(
    source: CalibrationSource,
    tokenizer: Any,
    label_ids: dict[str, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches: ``input_ids`` and ``attention_mask`` (right-padded), plus
    ``labels`` when the block has a label field (names mapped through ``label_ids``)."""
    spec = source.spec
    selected = rows(source)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    out = []
    for start in range(0, len(selected), spec.batch_size):
        chunk = selected[start : start + spec.batch_size]
        ids = [
            tokenizer(str(row[spec.text_field]), truncation=True, max_length=spec.max_length)[
                "input_ids"
            ]
            for row in chunk
        ]
        if not all(ids):
            raise RecipeError(
                f"an example of {source.where} has no tokens; remove empty texts",
                field=source.where,
            )
        width = max(len(i) for i in ids)
        batch = {
            "input_ids": torch.tensor([i + [pad] * (width - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
        }
        if spec.label_field is not None:
            batch["labels"] = torch.tensor(
                [_label(row[spec.label_field], label_ids, source) for row in chunk]
            )
        out.append(batch)
    return out


def _label(value: Any, label_ids: dict[str, int] | None, source: CalibrationSource) -> int:
    if label_ids and str(value) in label_ids:
        return label_ids[str(value)]
    is_number = isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
    if is_number and (label_ids is None or 0 <= int(value) < len(label_ids)):
        return int(value)
    known = ", ".join(label_ids or {}) or "integer class ids"
    raise RecipeError(
        f"label {excerpt(value)} is not one of the model's labels ({known}); fix the data or label_field",
        field=f"{source.where}.label_field",
    )


def resolve_recipe(
    recipe: Recipe, token: str | bool | None = None, hub_only: bool = False
) -> dict[ModelReference, CalibrationSource]:
    """Each input model's calibration data, resolved; a shared block is resolved once."""
    resolved: dict[int, CalibrationSource] = {}
    by_model = {}
    for i, entry in enumerate(recipe.models or []):
        spec = entry.calibration or recipe.calibration
        if spec is None:
            continue
        where = f"models[{i}].calibration" if entry.calibration else "calibration"
        if id(spec) not in resolved:
            resolved[id(spec)] = resolve(spec, where, token, hub_only)
        by_model[entry.model] = resolved[id(spec)]
    return by_model


def load_tokenizer(folders: list[Path | None], ref: ModelReference) -> Any:
    """The first tokenizer found among ``folders`` (the model's own, then the recipe's
    tokenizer donor)."""
    from transformers import AutoTokenizer

    for folder in folders:
        if folder and has_tokenizer_files(folder):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    raise SourceError(
        f"{ref} has no tokenizer files, and calibration text has to be tokenized; add them to the model or set tokenizer_source"
    )


def load_model(source: ModelSource) -> torch.nn.Module:
    """A checkpoint loaded with transformers (float32, no remote code) to run on calibration
    data: a sequence classifier when its config says so, else a causal LM; with its adapter
    applied when it is a ``base+adapter``."""
    loader = model_class(source.config)
    with building_model():
        model = loader.from_pretrained(source.folder, dtype=torch.float32, trust_remote_code=False)
    source.apply_adapter(model)
    return model.eval()
