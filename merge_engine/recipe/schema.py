"""The merge recipe: a pydantic schema that mirrors the mergekit YAML users already write.

A recipe names a ``merge_method`` and either ``models`` (whole models, merged tensor by tensor)
or ``slices`` (layer ranges, stacked in order: frankenmerging), plus ``parameters`` at three
levels (global, per slice, per model). Parameter values are scalars, gradients (a list of
numbers interpolated over the layers) or filter lists (``[{filter: mlp, value: 0.3}, ...]``).
Whether a method exists and which parameters it takes is checked against the method registry
by :mod:`merge_engine.plan.planner`, not here: this module only knows the shape of the YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from merge_engine.errors import RecipeError, excerpt
from merge_engine.recipe.hub_names import check_repo_id, check_revision
from merge_engine.recipe.limits import DEFAULT_LIMITS, RecipeLimits, check_examples, load_yaml
from merge_engine.recipe.patterns import compile_pattern, count_error

DTYPES = ("float32", "float16", "bfloat16", "float64")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATH_EXCERPT = 200  # how much of a path or reference a message quotes: local paths run long


def _is_local_model(path: str) -> bool:
    """An existing folder or ``.safetensors`` file (a single-file checkpoint); False for what
    no file system holds (a name too long, a NUL)."""
    try:
        found = Path(path).expanduser()
        return found.is_dir() or (found.suffix == ".safetensors" and found.is_file())
    except (OSError, ValueError):
        return False


class ModelReference:
    """``org/name``, ``org/name@revision``, a local folder or a local ``.safetensors`` file (a
    single-file checkpoint); or, as mergekit writes it, ``base+adapter``: a model with a LoRA
    adapter applied (each side any of those, pinnable on its own). Frozen, parses and prints
    back."""

    __slots__ = ("path", "revision", "adapter")

    def __init__(
        self, path: str, revision: str | None = None, adapter: ModelReference | None = None
    ):
        if adapter is not None and adapter.adapter is not None:
            raise ValueError("an adapter reference cannot carry an adapter of its own")
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "revision", revision)
        object.__setattr__(self, "adapter", adapter)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModelReference is immutable")

    def __copy__(self) -> ModelReference:
        return self

    def __deepcopy__(self, memo: dict) -> ModelReference:
        return self

    @classmethod
    def parse(cls, value: str | dict | ModelReference) -> ModelReference:
        if isinstance(value, ModelReference):
            return value
        if isinstance(value, dict):
            if set(value) - {"path", "revision"} or "path" not in value:
                raise ValueError(
                    "a model given as a mapping needs 'path' and optionally 'revision'"
                )
            ref = cls(str(value["path"]), value.get("revision"))
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(
                "a model reference must be a non-empty string: a folder, org/name or org/name@revision"
            )
        elif "+" in value and not _is_local_model(value.strip()):
            return cls._parse_composite(value.strip())
        elif _is_local_model(value.strip()):
            return cls(value.strip())
        else:
            path, _, revision = value.strip().partition("@")
            ref = cls(path, revision or None)
        if not ref.is_local:  # read from the Hub: its names, not "could not reach the Hub"
            check_repo_id(ref.path, "model")
            if ref.revision is not None:
                check_revision(ref.revision)
        return ref

    @classmethod
    def _parse_composite(cls, value: str) -> ModelReference:
        """``base+adapter``, split on the first ``+`` as mergekit does."""
        base_text, _, adapter_text = value.partition("+")
        if not base_text.strip() or not adapter_text.strip():
            raise ValueError(
                f"{excerpt(value, _PATH_EXCERPT)} has nothing on one side of '+'; write base+adapter, e.g. org/base+org/lora"
            )
        if "+" in adapter_text and not _is_local_model(adapter_text.strip()):
            raise ValueError(
                f"{excerpt(value, _PATH_EXCERPT)} applies more than one adapter ('+' twice); mergebot applies one adapter per model: merge the adapters into one first"
            )
        base = cls.parse(base_text)
        return cls(base.path, base.revision, cls.parse(adapter_text))

    @property
    def base(self) -> ModelReference:
        """The reference without its adapter (itself when it has none)."""
        return self if self.adapter is None else ModelReference(self.path, self.revision)

    def parts(self) -> list[ModelReference]:
        """The plain references read: [base, adapter], or [self]."""
        return [self] if self.adapter is None else [self.base, self.adapter]

    def with_revisions(self, revisions: Mapping[ModelReference, str]) -> ModelReference:
        """Each part pinned to its commit in ``revisions`` (keyed by plain references); a part
        not in it stays as it is."""
        base = self.base
        path, revision = base.path, revisions.get(base, base.revision)
        if self.adapter is None:
            return type(self)(path, revision)
        return type(self)(path, revision, self.adapter.with_revisions(revisions))

    @property
    def is_local(self) -> bool:
        """A folder on this machine, as opposed to a Hub repository id (a composite reference:
        its base; its adapter says for itself)."""
        if self.revision is None and _is_local_model(self.path):
            return True
        return not _HUB_ID.match(self.path)

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.adapter}" if self.adapter is not None else text

    def local_kind(self) -> str:
        """How a listing names a local reference: ``local file`` or ``local folder``."""
        return "local file" if self.path.endswith(".safetensors") else "local folder"

    def short(self) -> str:
        """As a table shows it: a commit SHA cut to its first 8 characters."""
        if self.adapter is not None:
            return f"{self.base.short()}+{self.adapter.short()}"
        if self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision):
            return f"{self.path}@{self.revision[:8]}"
        return str(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelReference) and (self.path, self.revision, self.adapter) == (
            other.path,
            other.revision,
            other.adapter,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.revision, self.adapter))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )


class DatasetReference(ModelReference):
    """``org/name`` or ``org/name@revision`` of a Hub dataset repo (never a local path: local
    files are the calibration block's ``path``). Distinct from a model of the same name."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: str | dict | ModelReference) -> DatasetReference:
        if isinstance(value, DatasetReference):
            return value
        if not isinstance(value, str) or not _HUB_ID.match(value.partition("@")[0].strip()):
            raise ValueError(
                f"dataset must be a Hub dataset repo as org/name or org/name@revision, got {excerpt(value, _PATH_EXCERPT)}; a local file goes in 'path'"
            )
        path, _, revision = value.strip().partition("@")
        check_repo_id(path, "dataset")
        if revision:
            check_revision(revision)
        return cls(path, revision or None)

    @property
    def is_local(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return type(other) is DatasetReference and (self.path, self.revision) == (
            other.path,
            other.revision,
        )

    def __hash__(self) -> int:
        return hash(("dataset", self.path, self.revision))


Scalar = bool | int | float | str


class ConditionalParameter(BaseModel):
    """One entry of a filter list: ``value`` applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


class BlockValues(BaseModel):
    """One value per block of a diffusion model's UNet, in the order users type them ("MBW"):
    for SD1.5 ``BASE, IN00…IN11, M00, OUT00…OUT11``, for SDXL ``BASE, IN00…IN08, M00,
    OUT00…OUT08``. ``blocks`` is a list of numbers or one comma-separated row; how many values
    the model needs is checked against its layout when the merge is planned."""

    model_config = ConfigDict(extra="forbid")
    blocks: list[float]

    @field_validator("blocks", mode="before")
    @classmethod
    def _row(cls, value: Any) -> Any:
        return block_row(value)


def block_row(value: Any) -> Any:
    """Block values typed as one comma-separated row (``"1,0,0.5"``) as a list of numbers."""
    if isinstance(value, str):
        try:
            return [float(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(
                f"blocks must be numbers separated by commas, got {excerpt(value)}"
            ) from None
    return value


ParameterSetting = (
    Scalar | list[Scalar] | ConditionalParameter | list[ConditionalParameter] | BlockValues
)
Parameters = dict[str, ParameterSetting]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


CALIBRATION_SUFFIXES = (".txt", ".jsonl", ".csv")


class DataBlock(_Strict):
    """Examples from exactly one of a local ``path`` (.txt: one example per line, .jsonl,
    .csv), a Hub ``dataset`` (``file`` names the file in it when it holds several) or inline
    ``examples``."""

    path: str | None = None
    dataset: DatasetReference | None = None
    file: str | None = None
    examples: list[str | dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataBlock:
        given = [k for k in ("path", "dataset", "examples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'path' (a local .txt, .jsonl or .csv file), 'dataset' (a Hub dataset repo) or 'examples' (a list)"
            )
        if self.path is not None and not self.path.endswith(CALIBRATION_SUFFIXES):
            raise ValueError(
                f"data file {excerpt(self.path, _PATH_EXCERPT)} must end in {', '.join(CALIBRATION_SUFFIXES)}"
            )
        if self.file is not None and self.dataset is None:
            raise ValueError("'file' names a file inside 'dataset'; give the dataset too")
        if self.examples is not None and not self.examples:
            raise ValueError("'examples' is empty; give at least one example")
        return self


class Calibration(DataBlock):
    """Data for the methods that need it (``fisher``, ``regmean``): exactly one of a local
    ``path`` (.txt: one example per line, .jsonl, .csv), a Hub ``dataset`` (``file`` names
    the file in it when it holds several) or inline ``examples``; then how to read it."""

    text_field: str = "text"
    label_field: str | None = None
    samples: int = Field(default=128, gt=0)
    max_length: int = Field(default=256, gt=1)
    batch_size: int = Field(default=8, gt=0)
    seed: int = 0


class Align(_Strict):
    """Before merging, permute every model's hidden units to match ``reference`` (default: the
    base model, else the first model): for models trained from different initialisations.
    ``weight_matching`` needs no data; ``activation_matching`` runs the reference's
    calibration data through both models."""

    method: Literal["weight_matching", "activation_matching"] = "weight_matching"
    reference: ModelReference | None = None
    repair: bool = False
    max_iter: int = Field(default=100, gt=0)
    seed: int = 0


class LoraEntry(_Strict):
    """A LoRA baked into a diffusion model before it is merged, as the WebUI's
    ``<lora:name:strength>`` does: ``lora`` is a kohya or diffusers LoRA file (a local
    ``.safetensors`` file, or a Hub repo holding one), ``strength`` its multiplier, ``blocks``
    one strength per block (the LoRA Block Weight extension's rows, ``BASE`` being the text
    encoders), each multiplied by ``strength``."""

    lora: ModelReference
    strength: float = Field(default=1.0, allow_inf_nan=False)
    blocks: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None

    @field_validator("lora")
    @classmethod
    def _plain(cls, value: ModelReference) -> ModelReference:
        if value.adapter is not None:
            raise ValueError(
                f"a LoRA is one file, not base+adapter; got {excerpt(str(value), _PATH_EXCERPT)}"
            )
        return value

    @field_validator("blocks", mode="before")
    @classmethod
    def _row(cls, value: Any) -> Any:
        return block_row(value)


class InputModel(_Strict):
    model: ModelReference
    parameters: Parameters | None = None
    calibration: Calibration | None = None
    loras: list[LoraEntry] | None = None
    """Diffusion models: LoRAs baked into this model, in order, before it is merged."""


class InputSlice(_Strict):
    model: ModelReference
    layer_range: tuple[int, int] = Field(description="half-open [start, end) range of layers")
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range [{start}, {end}] is empty or negative; write [start, end) with 0 <= start < end"
            )
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(
                f"{excerpt(str(s.model), _PATH_EXCERPT)}{list(s.layer_range)}" for s in self.sources
            )
            raise ValueError(
                f"all sources of a slice must span the same number of layers, got {ranges}"
            )
        return self


def _limits(info: ValidationInfo) -> RecipeLimits:
    """The limits a recipe is read within: ``recipe_from_text``'s, passed as context."""
    return (info.context or {}).get("limits", DEFAULT_LIMITS)


def _user_pattern(pattern: str, info: ValidationInfo) -> str:
    compile_pattern(pattern, _limits(info).max_pattern_chars)
    return pattern


class Recipe(_Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelReference | None = None
    parameters: Parameters | None = None
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: Literal["base"] | ModelReference | None = Field(
        default=None, union_mode="left_to_right"
    )
    random_seed: int | None = None
    calibration: Calibration | None = None
    """Shared calibration data, for every model without a block of its own."""
    align: Align | None = None
    vae: ModelReference | None = None
    """Diffusion models: a VAE baked into the output in place of the merged one (a diffusers
    VAE, a single-file VAE, or a whole checkpoint whose VAE is taken)."""
    discard: list[Annotated[str, AfterValidator(_user_pattern)]] | None = None
    """Regular expressions (run by RE2): output tensors whose name matches one are left out."""
    output_layout: Literal["diffusers", "single_file"] | None = None
    """Diffusion models: the layout written; the sources' when not given."""
    output: Literal["model", "adapter"] | None = None
    """``adapter``: the models are LoRA adapters of ``base_model``, combined into one PEFT
    adapter by ``merge_method``, one of PEFT's ``add_weighted_adapter`` combination types
    (see :mod:`merge_engine.plan.adapter_recipe`); a model when not given."""

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer_source(cls, value: Any) -> Any:
        if value == "union":
            raise ValueError(
                "'union' (building a merged vocabulary) is not supported; use 'base' or one of the models"
            )
        return value

    @field_validator("discard", mode="before")
    @classmethod
    def _pattern_count(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuses too many patterns before any is read (see :mod:`merge_engine.recipe.patterns`)."""
        too_many = isinstance(value, list) and count_error(value, _limits(info))
        if too_many:
            raise ValueError(too_many)
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError(
                "give exactly one of 'models' (whole models) or 'slices' (layer ranges)"
            )
        return self

    # --- what the rest of the engine asks of a recipe -------------------------------------

    def input_models(self) -> list[ModelReference]:
        """The models named as inputs, in recipe order, each once (the base is not added)."""
        seen: dict[ModelReference, None] = {}
        if self.models:
            for m in self.models:
                seen.setdefault(m.model, None)
        for s in self.slices or []:
            for src in s.sources:
                seen.setdefault(src.model, None)
        return list(seen)

    def referenced_models(self) -> list[ModelReference]:
        """Every model whose files the merge reads: the base first, then the inputs in order."""
        refs = [self.base_model] if self.base_model else []
        refs += [s.base_model for s in self.slices or [] if s.base_model]
        tokenizer = (
            self.tokenizer_source if isinstance(self.tokenizer_source, ModelReference) else None
        )
        refs += self.input_models() + ([tokenizer] if tokenizer else [])
        refs += [self.vae] if self.vae else []
        refs += self.lora_references()
        return list(dict.fromkeys(refs))

    def lora_references(self) -> list[ModelReference]:
        """Every LoRA file baked into a model (``models[i].loras``), each once."""
        loras = [entry.lora for m in self.models or [] for entry in m.loras or []]
        return list(dict.fromkeys(loras))

    def parameter_levels(self) -> list[tuple[str, Parameters | None, str]]:
        """Every parameters block: (path, block, level), level ``global``, ``slice`` or
        ``model``."""
        levels = [("parameters", self.parameters, "global")]
        for i, m in enumerate(self.models or []):
            levels.append((f"models[{i}].parameters", m.parameters, "model"))
        for i, s in enumerate(self.slices or []):
            levels.append((f"slices[{i}].parameters", s.parameters, "slice"))
            for j, src in enumerate(s.sources):
                levels.append((f"slices[{i}].sources[{j}].parameters", src.parameters, "model"))
        return levels

    def calibration_for(self, index: int) -> Calibration | None:
        """The calibration data of ``models[index]``: its own block, else the shared one."""
        own = self.models[index].calibration if self.models else None
        return own or self.calibration

    def aligns_on_data(self) -> bool:
        """The align step reads calibration data (activation matching)."""
        return self.align is not None and self.align.method == "activation_matching"

    def datasets(self) -> list[DatasetReference]:
        """Every Hub dataset the calibration blocks read, each once."""
        blocks = [self.calibration] + [m.calibration for m in self.models or []]
        return list(dict.fromkeys(b.dataset for b in blocks if b and b.dataset))

    def donor(self) -> ModelReference:
        """Where config and tokenizer come from: the base model, else the first input model."""
        return self.base_model or self.input_models()[0]

    def tokenizer_donor(self) -> ModelReference:
        if isinstance(self.tokenizer_source, ModelReference):
            return self.tokenizer_source
        return self.donor()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def with_revisions(self, revisions: dict[ModelReference, str]) -> Recipe:
        """The same recipe with each Hub reference pinned to the given commit."""
        return with_revisions(self, revisions)


ModelT = TypeVar("ModelT", bound=BaseModel)


def with_revisions(document: ModelT, revisions: dict[ModelReference, str]) -> ModelT:
    """A copy of ``document`` (a recipe, a search spec) with each reference in ``revisions``
    (a model's or a dataset's) pinned to the given commit; a ``base+adapter`` reference has
    each part pinned (``revisions`` is keyed by plain references)."""

    def pin(value: Any) -> Any:
        if isinstance(value, DatasetReference) and value in revisions:
            return DatasetReference(value.path, revisions[value])
        if isinstance(value, ModelReference) and not isinstance(value, DatasetReference):
            return value.with_revisions(revisions)
        if isinstance(value, BaseModel):
            return value.model_copy(
                update={k: pin(getattr(value, k)) for k in type(value).model_fields}
            )
        if isinstance(value, list):
            return [pin(v) for v in value]
        return value

    return pin(document)


_UNION_TAGS = {"bool", "int", "float", "str", "ConditionalParameter", "BlockValues"}


def _field_path(loc: tuple[Any, ...], blocks: tuple[str, ...] = ("parameters",)) -> str:
    """('models', 1, 'parameters', 'density', 'float') -> 'models[1].parameters.density';
    the path stops at the name inside a parameters block (a field whose name ends in one of
    ``blocks``), whose value is a union of many shapes."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif isinstance(item, str) and item not in _UNION_TAGS and "[" not in item:
            # pydantic names union members ('float', 'list[...]'): not fields; a long key is cut
            parts.append(item if len(item) <= 60 else excerpt(item))
        if len(parts) >= 2 and parts[-2].endswith(blocks):
            break
    return ".".join(parts)


def _sentence(error: dict[str, Any], path: str, document: str, blocks: tuple[str, ...]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"is not a {document} field; check its spelling or remove it"
    if error["type"] == "missing":
        return "is required"
    if path.split(".")[-2:-1] and path.split(".")[-2].endswith(blocks):
        return "must be a number, true/false, a list of numbers (a gradient), a list of {filter, value} entries or {blocks: [one value per block]}"
    if error["type"] == "literal_error" and "dtype" in path:
        return f"must be one of {', '.join(DTYPES)}, got {excerpt(error.get('input'))}"
    if error["type"] == "literal_error":
        return f"must be {error['ctx']['expected']}, got {excerpt(error.get('input'))}"
    if error["type"] in ("greater_than", "greater_than_equal"):
        bound = "greater than" if error["type"] == "greater_than" else "at least"
        limit = error["ctx"].get("gt", error["ctx"].get("ge"))
        return f"must be {bound} {limit}, got {excerpt(error.get('input'))}"
    if error["type"] in ("less_than", "less_than_equal"):
        bound = "less than" if error["type"] == "less_than" else "at most"
        limit = error["ctx"].get("lt", error["ctx"].get("le"))
        return f"must be {bound} {limit}, got {excerpt(error.get('input'))}"
    if error["type"] == "finite_number":
        return f"must be a finite number, got {excerpt(error.get('input'))}; write a number"
    return message


def parse_recipe(data: Any, limits: RecipeLimits = DEFAULT_LIMITS) -> Recipe:
    """Validate a recipe given as a mapping; every error names the field and the fix."""
    if not isinstance(data, dict):
        raise RecipeError(
            "a recipe must be a YAML mapping with at least 'merge_method' and 'models' or 'slices'"
        )
    try:
        return Recipe.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise first_error(exc, "recipe") from None


def first_error(
    exc: ValidationError, document: str, blocks: tuple[str, ...] = ("parameters",)
) -> RecipeError:
    """A pydantic error as one sentence about its first field; ``document`` names what was
    read ("recipe", "search spec") in the sentence for an unknown field, ``blocks`` the
    fields that hold merge parameters as a recipe writes them."""
    # Unions report one error per alternative; the first error per field is the useful one.
    first: dict[str, dict[str, Any]] = {}
    for error in exc.errors():
        first.setdefault(_field_path(error["loc"], blocks), error)
    path, error = next(iter(first.items()))
    return RecipeError(_sentence(error, path, document, blocks), field=path or None)


def load_recipe(path_or_text: str | Path, limits: RecipeLimits = DEFAULT_LIMITS) -> Recipe:
    """Read a recipe from a YAML file path or YAML text (safe loader only), within ``limits``."""
    text = str(path_or_text)
    if isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yml", ".yaml"))):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"recipe file {text} is not UTF-8 text; save it as UTF-8") from None
        except (OSError, ValueError):  # missing, a folder, unreadable, a name too long, a NUL
            raise RecipeError(
                f"recipe file {excerpt(text, _PATH_EXCERPT)} does not exist or cannot be read; check the path"
            ) from None
    return recipe_from_text(text, limits)


def recipe_from_text(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> Recipe:
    """Read a recipe from YAML text, never from a path (what the service gets from people),
    refusing anything beyond ``limits``."""
    recipe = parse_recipe(load_yaml(text, limits), limits)
    _check_examples(recipe, limits)
    _check_names(recipe, "", limits.max_name_chars)
    return recipe


def _check_examples(recipe: Recipe, limits: RecipeLimits) -> None:
    blocks = [("calibration", recipe.calibration)]
    blocks += [
        (f"models[{i}].calibration", m.calibration) for i, m in enumerate(recipe.models or ())
    ]
    for where, block in blocks:
        if block and block.examples:
            check_examples(block.examples, where, limits)


def _check_names(value: Any, where: str, limit: int) -> None:
    """Every reference, string and parameter name of the recipe (inline examples aside) is at
    most ``limit`` characters."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            if name not in ("examples", "discard"):  # each has a limit of its own
                _check_names(getattr(value, name), f"{where}.{name}".lstrip("."), limit)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_names(item, f"{where}[{index}]", limit)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_names(key, f"{where}.{excerpt(key)}", limit)
            _check_names(item, f"{where}.{key}", limit)
    elif isinstance(value, str | ModelReference) and len(str(value)) > limit:
        raise RecipeError(
            f"is {len(str(value)):,} characters long, more than the {limit} allowed for a name "
            "or reference; shorten it",
            field=where,
        )
