"""Recipe + input metadata → one task per output tensor, with every parameter resolved.

Building the plan is the pre-flight: it reads only what :mod:`merge_engine.sources.inspection` learned
from configs and headers, and it raises every recipe or compatibility error before a single
weight is read. The runner then only executes tasks.
"""

from __future__ import annotations

import copy
import difflib
import secrets
from dataclasses import dataclass, replace
from typing import Any

import torch

from merge_engine.align.step import plan_alignment
from merge_engine.data.calibration import CalibrationSource
from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.methods import MergeMethod, get_method
from merge_engine.plan.merge_plan import DTYPES, MergePlan, TensorInput, TensorTask
from merge_engine.plan.writes import bake_vae, plan_writes, vae_source
from merge_engine.recipe.parameters import Place, Scope, resolve, varies_by_tensor
from merge_engine.recipe.schema import InputSlice, ModelReference, Recipe
from merge_engine.sources import layers
from merge_engine.sources.formats.blocks import diffusion_places
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.formats.recipe_checks import check_layout, common_layout
from merge_engine.sources.inspection import LAYER_COUNT_KEYS, ModelSource, model_task

# --- the recipe against the method ---------------------------------------------------------


def check_parameter_names(recipe: Recipe, method: MergeMethod) -> None:
    known = {p.name: p for p in method.params}
    for path, block, level in recipe.parameter_levels():
        for name in block or {}:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                takes = ", ".join(known) or "no parameters"
                hint = f"did you mean '{close[0]}'?" if close else f"{method.name} takes: {takes}"
                raise RecipeError(
                    f"'{name}' is not a parameter of {method.name}; {hint}", field=f"{path}.{name}"
                )
            if level == "model" and known[name].scope == "global":
                raise RecipeError(
                    f"'{name}' applies to the whole merge, not to one model; move it to the top-level or slice parameters",
                    field=f"{path}.{name}",
                )


def _check_input_count(method: MergeMethod, count: int, where: str) -> None:
    def models(n: int) -> str:
        besides = " besides the base" if method.base != "unused" else ""
        return f"{n} model{'s' if n != 1 else ''}{besides}"

    if count < method.min_inputs:
        raise RecipeError(
            f"{method.name} needs at least {models(method.min_inputs)}, got {count}", field=where
        )
    if method.max_inputs is not None and count > method.max_inputs:
        exact = "exactly" if method.max_inputs == method.min_inputs else "at most"
        hint = (
            "; stack layers from several models with 'slices' instead"
            if method.layer_stacking
            else ""
        )
        raise RecipeError(
            f"{method.name} takes {exact} {models(method.max_inputs)}, got {count}{hint}",
            field=where,
        )


# --- resolving one tensor's parameters --------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    """One model's tensor for an output: ``name`` is what filters match (the model's own
    name for it, as mergekit does), ``read`` what is loaded (a tied head reads the embedding)."""

    model: ModelReference
    name: str
    read: str
    scope: Scope | None = None


@dataclass
class _Group:
    """The inputs of one output tensor before parameters are resolved."""

    inputs: list[_Input]
    base: _Input | None
    shared_scopes: list[Scope]
    place: Place


class _Planner:
    def __init__(self, recipe: Recipe, sources: dict[ModelReference, ModelSource]):
        self.recipe = recipe
        self.method = get_method(recipe.merge_method)
        self.sources = sources
        self.tasks: list[TensorTask] = []

    def member(
        self,
        model: ModelReference,
        name: str,
        expected: tuple[int, ...],
        output: str,
        reference: ModelReference,
        scope: Scope | None = None,
    ) -> _Input:
        """Model ``model``'s tensor ``name`` as an input of ``output``, checked against the
        shape ``expected`` from ``reference`` (tied heads read the input embedding)."""
        tensors = self.sources[model].tensors
        read = name
        if name not in tensors:
            read = layers.tied_embedding(name, tensors)
            if read is None:
                raise IncompatibleModelsError(
                    f"model {model} has no tensor {name}, which the other models have; models must share one architecture"
                )
        shape = tensors[read].shape
        if shape != expected:
            raise IncompatibleModelsError(
                self._shape_message(model, read, shape, expected, output, reference)
            )
        return _Input(model, name, read, scope)

    def _shape_message(
        self,
        model: ModelReference,
        name: str,
        shape: tuple,
        expected: tuple,
        output: str,
        donor: ModelReference,
    ) -> str:
        vocab_tensor = layers.is_input_embedding(name) or layers.is_output_head(name)
        if vocab_tensor and shape[1:] == expected[1:]:
            return (
                f"vocabulary sizes differ: {model} has {shape[0]} tokens in {name}, {donor} has {expected[0]}; "
                "resize the embeddings to one tokenizer before merging"
            )
        return f"tensor {name} of {model} has shape {list(shape)}, but {list(expected)} in {donor}; the models must share one architecture"

    def resolve_task(self, output: str, shape: tuple[int, ...], group: _Group) -> None:
        method = self.method
        all_reads = [*group.inputs, *([group.base] if group.base else [])]
        dtypes = [self.sources[i.model].tensors[i.read].dtype for i in all_reads]
        if not all(d.is_floating_point for d in dtypes):
            donor = group.base or all_reads[0]
            copy_from = TensorInput(donor.model, donor.read)
            dtype = dtypes[all_reads.index(donor)]
            self.tasks.append(
                TensorTask(output, shape, [copy_from], None, {}, [{}], dtype, dtype, copy_only=True)
            )
            return
        natural = _promote(dtypes)
        compute = DTYPES[self.recipe.dtype] if self.recipe.dtype else natural
        if not self.recipe.dtype and self.sources[all_reads[0].model].layout != TRANSFORMERS:
            # as the WebUIs and sd-mecha do: half-precision checkpoints are merged in float32
            compute = torch.promote_types(natural, torch.float32)
        out = DTYPES.get(self.recipe.out_dtype or self.recipe.dtype or "", natural)

        shared = {}
        for param in method.global_params:
            found = resolve(param.name, group.shared_scopes, group.place)
            varies = varies_by_tensor(param.name, group.shared_scopes)
            shared[param.name] = self._value(param, found, output if varies else None, None)
        per_model = []
        for member in group.inputs:
            values = {}
            scopes = [member.scope, *group.shared_scopes]
            for param in method.per_model_params:
                found = resolve(param.name, scopes, replace(group.place, name=member.name))
                varies = varies_by_tensor(param.name, scopes)
                values[param.name] = self._value(
                    param, found, output if varies else None, member.model, member.scope[0]
                )
            per_model.append(values)
        if method.check and (problem := method.check(shared, per_model)):
            scopes = [i.scope for i in group.inputs if i.scope] + group.shared_scopes
            varies = any(varies_by_tensor(p.name, scopes) for p in method.params)
            raise RecipeError(
                f"{problem} (tensor {output})" if varies else problem, field="parameters"
            )
        base = TensorInput(group.base.model, group.base.read) if group.base else None
        inputs = [TensorInput(i.model, i.read) for i in group.inputs]
        self.tasks.append(TensorTask(output, shape, inputs, base, shared, per_model, compute, out))

    def _value(
        self,
        param,
        found,
        tensor: str | None,
        model: ModelReference | None,
        model_path: str | None = None,
    ) -> Any:
        """``param``'s value resolved for one tensor, coerced and checked; a refusal names
        ``tensor`` only where it is given: where the value may differ between tensors
        (a gradient, filters, block values), not where it is one for the whole model."""
        if found is None:
            if param.required:
                where = f"{model_path}.{param.name}" if model_path else f"parameters.{param.name}"
                whose = f" for model {model}" if model else ""
                if tensor:
                    raise RecipeError(
                        f"{self.method.name} needs '{param.name}'{whose} on tensor {tensor}, which no "
                        f"filter of '{param.name}' matches; add an entry without a filter, the value "
                        "for every tensor the filters leave out",
                        field=where,
                    )
                fix = (
                    "set it for that model or in the top-level parameters"
                    if model
                    else "set it in the top-level parameters"
                )
                raise RecipeError(
                    f"{self.method.name} needs '{param.name}'{whose}; {fix}", field=where
                )
            return param.default
        value, path = found
        try:
            return param.coerce(value, path)
        except RecipeError as error:
            named = [f"model {model}"] if model else []
            named += [f"tensor {tensor}"] if tensor else []
            context = f" ({', '.join(named)})" if named else ""
            raise RecipeError(str(error).removeprefix(f"{path}: ") + context, field=path) from None

    # --- models: whole models merged tensor by tensor ------------------------------------

    def plan_models(self) -> None:
        recipe, method = self.recipe, self.method
        models = [m.model for m in recipe.models]
        for i, ref in enumerate(models):
            if ref in models[:i]:
                raise RecipeError(
                    f"model {ref} is listed twice; list each model once", field=f"models[{i}].model"
                )
        base = recipe.base_model if method.base != "unused" else None
        scopes = {
            m.model: (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)
        }
        inputs = [ref for ref in models if ref != base]
        _check_input_count(method, len(inputs), "models")
        donor = self.sources[recipe.donor()]
        if donor.layout == TRANSFORMERS:
            self._check_same_layers([base, *inputs] if base else inputs)
        self._check_no_extra_tensors(donor, [base, *inputs] if base else inputs)
        places = tensor_places(donor)
        global_scope: Scope = ("parameters", recipe.parameters)
        for name in places:
            shape = donor.tensors[name].shape
            group = _Group(
                inputs=[
                    self.member(ref, name, shape, name, donor.ref, scopes[ref]) for ref in inputs
                ],
                base=self.member(base, name, shape, name, donor.ref) if base else None,
                shared_scopes=[global_scope],
                place=places[name],
            )
            self.resolve_task(name, shape, group)

    def _check_same_layers(self, models: list[ModelReference]) -> None:
        counts = {ref: layers.layer_counts(self.sources[ref].tensors) for ref in models}
        first = models[0]
        for ref in models[1:]:
            if counts[ref] != counts[first]:
                raise IncompatibleModelsError(
                    f"{ref} has {_describe_layers(counts[ref])} but {first} has {_describe_layers(counts[first])}; "
                    "merge models of one architecture, or use 'slices' to pick layer ranges"
                )

    def _check_no_extra_tensors(self, donor: ModelSource, models: list[ModelReference]) -> None:
        for ref in models:
            extra = [
                n
                for n in self.sources[ref].tensors
                if n not in donor.tensors and not layers.tied_embedding(n, donor.tensors)
            ]
            if extra:
                raise IncompatibleModelsError(
                    f"model {ref} has {len(extra)} tensor(s) that {donor.ref} lacks (e.g. {sorted(extra)[0]}); "
                    "the models must share one architecture"
                )

    # --- slices: layer ranges, stacked in order -------------------------------------------

    def plan_slices(self) -> None:
        recipe, method = self.recipe, self.method
        out_layer = 0
        layer_sources: list[
            tuple[ModelReference, int]
        ] = []  # (model, input layer) per output layer
        body: list[tuple[str, tuple[int, ...], _Group]] = []
        for i, out_slice in enumerate(recipe.slices):
            base_ref = (
                (out_slice.base_model or recipe.base_model) if method.base != "unused" else None
            )
            sources = out_slice.sources
            if base_ref and base_ref not in [s.model for s in sources]:
                raise RecipeError(
                    f"base model {base_ref} must be one of this slice's sources, with the layer_range to use as base",
                    field=f"slices[{i}].sources",
                )
            if method.base == "required" and base_ref is None:
                raise RecipeError(
                    f"{method.name} works on differences from a base model, and this slice names none; "
                    "set base_model here or at the top level",
                    field=f"slices[{i}].base_model",
                )
            inputs = [(j, s) for j, s in enumerate(sources) if s.model != base_ref]
            base_src = next((s for s in sources if s.model == base_ref), None)
            _check_input_count(method, len(inputs), f"slices[{i}].sources")
            for j, src in enumerate(sources):
                self._check_layer_range(
                    src.model, src.layer_range, f"slices[{i}].sources[{j}].layer_range"
                )
            template = self.sources[sources[0].model]
            prefix = self._single_stack(template)
            length = sources[0].layer_range[1] - sources[0].layer_range[0]
            shared_scopes: list[Scope] = [
                (f"slices[{i}].parameters", out_slice.parameters),
                ("parameters", recipe.parameters),
            ]
            for offset in range(length):
                t = _position(offset, length)
                source_layer = sources[0].layer_range[0] + offset
                rests = sorted(
                    (lay.rest, n)
                    for n in template.tensors
                    if (lay := layers.split_layer(n))
                    and lay.prefix == prefix
                    and lay.index == source_layer
                )
                for rest, template_name in rests:
                    output = f"{prefix}.{out_layer}.{rest}"
                    shape = template.tensors[template_name].shape

                    def at(
                        src: InputSlice,
                        offset: int = offset,
                        rest: str = rest,
                        prefix: str = prefix,
                    ) -> str:
                        return f"{prefix}.{src.layer_range[0] + offset}.{rest}"

                    group = _Group(
                        inputs=[
                            self.member(
                                s.model,
                                at(s),
                                shape,
                                output,
                                template.ref,
                                (f"slices[{i}].sources[{j}].parameters", s.parameters),
                            )
                            for j, s in inputs
                        ],
                        base=self.member(base_src.model, at(base_src), shape, output, template.ref)
                        if base_src
                        else None,
                        shared_scopes=shared_scopes,
                        place=Place(output, t),
                    )
                    body.append((output, shape, group))
                layer_sources.append((sources[0].model, source_layer))
                out_layer += 1
        self._plan_outside_layers(before=True)
        for output, shape, group in body:
            self.resolve_task(output, shape, group)
        self._plan_outside_layers(before=False)
        self.layer_sources = layer_sources

    def _plan_outside_layers(self, before: bool) -> None:
        """Embeddings come from the first slice's models, final norm and head from the last slice's."""
        index = 0 if before else len(self.recipe.slices) - 1
        out_slice = self.recipe.slices[index]
        base_ref = (
            (out_slice.base_model or self.recipe.base_model)
            if self.method.base != "unused"
            else None
        )
        template = self.sources[out_slice.sources[0].model]
        names = [
            n
            for n in sorted(template.tensors, key=layers.sort_key)
            if not layers.split_layer(n) and layers.is_before_layers(n) == before
        ]
        scopes = [
            (f"slices[{index}].parameters", out_slice.parameters),
            ("parameters", self.recipe.parameters),
        ]
        for name in names:
            shape = template.tensors[name].shape
            group = _Group(
                inputs=[
                    self.member(
                        s.model,
                        name,
                        shape,
                        name,
                        template.ref,
                        (f"slices[{index}].sources[{j}].parameters", s.parameters),
                    )
                    for j, s in enumerate(out_slice.sources)
                    if s.model != base_ref
                ],
                base=self.member(base_ref, name, shape, name, template.ref) if base_ref else None,
                shared_scopes=scopes,
                place=Place(name, _outside_position(name)),
            )
            self.resolve_task(name, shape, group)

    def _single_stack(self, source: ModelSource) -> str:
        counts = layers.layer_counts(source.tensors)
        if len(counts) != 1:
            raise IncompatibleModelsError(
                f"slices need a model with one stack of layers; {source.ref} has {_describe_layers(counts)}"
            )
        return next(iter(counts))

    def _check_layer_range(
        self, ref: ModelReference, layer_range: tuple[int, int], where: str
    ) -> None:
        counts = layers.layer_counts(self.sources[ref].tensors)
        total = max(counts.values(), default=0)
        if layer_range[1] > total:
            raise RecipeError(
                f"{ref} has {total} layers, so [{layer_range[0]}, {layer_range[1]}) does not fit; the end must be at most {total}",
                field=where,
            )

    # --- the output config -------------------------------------------------------------------

    def output_config(self) -> dict[str, Any]:
        donor = self.sources[self.recipe.donor()]
        config = copy.deepcopy(donor.config)
        if self.recipe.slices:
            total = len(self.layer_sources)
            old = donor.num_layers
            for key in LAYER_COUNT_KEYS:
                if key in config:
                    config[key] = total
            for key, value in donor.config.items():
                if (
                    isinstance(value, list)
                    and old is not None
                    and len(value) == old
                    and key not in LAYER_COUNT_KEYS
                ):
                    config[key] = [
                        self._layer_config_value(key, ref, index)
                        for ref, index in self.layer_sources
                    ]
        out = next((t.out_dtype for t in self.tasks if not t.copy_only), None)
        if out is not None:
            name = next(k for k, v in DTYPES.items() if v == out)
            config[
                "torch_dtype" if "torch_dtype" in config or "dtype" not in config else "dtype"
            ] = name
        return config

    def _layer_config_value(self, key: str, ref: ModelReference, index: int) -> Any:
        values = self.sources[ref].config.get(key)
        if not isinstance(values, list) or index >= len(values):
            raise IncompatibleModelsError(
                f"config.json of {ref} has no per-layer '{key}' entry for layer {index}, which the output config needs"
            )
        return values[index]


def _position(index: int, count: int) -> float:
    """A layer's place in its slice, for gradients: 0 for the first layer, 1 for the last."""
    return index / (count - 1) if count > 1 else 1.0


def _outside_position(name: str) -> float:
    """A gradient's position for a tensor outside the layers, as mergekit places it: the
    embeddings take the first layer's value (0), the final norm and head the last layer's (1)."""
    return 0.0 if layers.is_before_layers(name) else 1.0


def tensor_places(source: ModelSource) -> dict[str, Place]:
    """Where each of a model's tensors sits, in the order the merge writes them: layers in
    order for a transformers model (gradients run over them), blocks for a diffusion model
    (gradients run over the block list)."""
    if source.layout.is_diffusion:
        return diffusion_places(source.layout, {n: i.shape for n, i in source.tensors.items()})
    names = sorted(source.tensors, key=layers.sort_key)
    counts = layers.layer_counts(names)
    places = {}
    for name in names:
        layer = layers.split_layer(name)
        t = _position(layer.index, counts[layer.prefix]) if layer else _outside_position(name)
        places[name] = Place(name, t)
    return places


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _describe_layers(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} layers under {p}" for p, n in counts.items()) or "no layers"


def _check_tokenizer_vocabulary(
    recipe: Recipe, sources: dict[ModelReference, ModelSource], tasks: list[TensorTask]
) -> None:
    """mergebot copies the tokenizer; it does not remap embeddings, so the vocabularies must agree."""
    if not isinstance(recipe.tokenizer_source, ModelReference):
        return
    tokens = sources[recipe.tokenizer_source].config.get("vocab_size")
    rows = next((t.shape[0] for t in tasks if layers.is_input_embedding(t.output)), None)
    if isinstance(tokens, int) and rows is not None and tokens != rows:
        raise RecipeError(
            f"{recipe.tokenizer_source} has a vocabulary of {tokens} tokens but the merged embeddings have {rows} rows; "
            "mergebot copies the tokenizer without remapping embeddings, so pick a tokenizer_source with the same vocabulary",
            field="tokenizer_source",
        )


def _check_calibration(
    recipe: Recipe,
    method: MergeMethod,
    sources: dict[ModelReference, ModelSource],
    calibration: dict[ModelReference, CalibrationSource],
) -> list[str]:
    """A method that needs data gets it for every model it can run; returns notes."""
    given = recipe.calibration or any(m.calibration for m in recipe.models or [])
    if not method.needs_data:
        if given and not recipe.aligns_on_data():
            return [f"{method.name} uses no data: the calibration block is ignored"]
        return []
    if not recipe.models:
        raise RecipeError(
            f"{method.name} merges whole models with their calibration data; list them under 'models', not 'slices'",
            field="slices",
        )
    for i, entry in enumerate(recipe.models):
        where = f"models[{i}]"
        if entry.model not in calibration:
            raise RecipeError(
                f"{method.name} needs calibration data for {entry.model}: add a calibration block to it, or a shared one at the top level",
                field=f"{where}.calibration",
            )
        config = sources[entry.model].config
        task = model_task(config)
        if task is None:
            found = (config.get("architectures") or ["no architecture"])[0]
            raise IncompatibleModelsError(
                f"{method.name} runs each model on its calibration data, which mergebot does for causal LMs and "
                f"sequence classifiers; {entry.model} is {found}"
            )
        if task == "causal_lm" and calibration[entry.model].spec.label_field:
            raise RecipeError(
                f"{entry.model} is a causal LM, which learns from the text itself; remove label_field",
                field=f"{calibration[entry.model].where}.label_field",
            )
    return []


def build_plan(
    recipe: Recipe,
    sources: dict[ModelReference, ModelSource],
    seed: int | None = None,
    calibration: dict[ModelReference, CalibrationSource] | None = None,
) -> MergePlan:
    """Check the recipe against the models' metadata and resolve every output tensor.
    ``calibration`` holds each input model's resolved calibration data (methods that need data)."""
    planner = _Planner(recipe, sources)
    method = planner.method
    check_parameter_names(recipe, method)
    layout = common_layout(recipe, {ref: s.layout for ref, s in sources.items()})
    check_layout(recipe, layout, method.needs_data, method.name)
    calibration = calibration or {}
    notes = _check_calibration(recipe, method, sources, calibration)
    if (
        method.base == "required"
        and not recipe.base_model
        and not any(s.base_model for s in recipe.slices or [])
    ):
        raise RecipeError(
            f"{method.name} works on differences from a base model; name it in base_model",
            field="base_model",
        )
    if (
        recipe.base_model
        and method.base == "unused"
        and recipe.base_model not in recipe.input_models()
    ):
        notes.append(
            f"{method.name} does not use a base model: {recipe.base_model} only donates config and tokenizer"
        )
    if recipe.models:
        planner.plan_models()
    else:
        planner.plan_slices()
    _check_tokenizer_vocabulary(recipe, sources, planner.tasks)
    tasks, sources = planner.tasks, dict(sources)
    if recipe.vae and recipe.vae not in recipe.input_models() and recipe.vae != recipe.base_model:
        sources[recipe.vae] = vae_source(sources[recipe.vae], layout)
    if recipe.vae:
        tasks = bake_vae(tasks, sources[recipe.vae], DTYPES.get(recipe.out_dtype or ""))
    output_format = recipe.output_layout or layout.format
    tasks, writes = plan_writes(tasks, layout, output_format, recipe.discard or [])
    if method.random:
        seed = (
            recipe.random_seed
            if recipe.random_seed is not None
            else (seed if seed is not None else secrets.randbits(31))
        )
    config = (
        planner.output_config() if layout == TRANSFORMERS else dict(sources[recipe.donor()].config)
    )
    plan = MergePlan(
        recipe,
        method,
        sources,
        tasks,
        config,
        seed,
        notes,
        calibration,
        layout=layout,
        output_format=output_format,
        writes=writes,
    )
    read = [ref for ref in recipe.referenced_models() if ref in plan.read_models]
    plan.alignment = plan_alignment(recipe, sources, read, calibration, method.needs_data)
    return plan
