"""One output tensor's task: each model's tensor checked against the others' shape (a tied head
reads the input embedding), the compute and output dtypes chosen, and every parameter resolved
for that tensor (precedence, filters, gradients) and checked against the method."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.methods import MergeMethod, get_method
from merge_engine.plan.merge_plan import DTYPES, TensorInput, TensorTask
from merge_engine.recipe.parameters import Place, Scope, resolve, varies_by_tensor
from merge_engine.recipe.schema import ModelReference, Recipe
from merge_engine.sources import layers
from merge_engine.sources.formats.layouts import TRANSFORMERS
from merge_engine.sources.inspection import ModelSource


@dataclass(frozen=True)
class SourceTensor:
    """One model's tensor for an output: ``name`` is what filters match (the model's own
    name for it, as mergekit does), ``read`` what is loaded (a tied head reads the embedding)."""

    model: ModelReference
    name: str
    read: str
    scope: Scope | None = None


@dataclass
class InputGroup:
    """The inputs of one output tensor before parameters are resolved."""

    inputs: list[SourceTensor]
    base: SourceTensor | None
    shared_scopes: list[Scope]
    place: Place


class TaskResolver:
    """Turns each output tensor's inputs into a task: their shapes checked against each other
    and every parameter resolved; the tasks are kept in order in ``tasks``."""

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
    ) -> SourceTensor:
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
        return SourceTensor(model, name, read, scope)

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

    def resolve_task(self, output: str, shape: tuple[int, ...], group: InputGroup) -> None:
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
        natural = promote(dtypes)
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


def check_input_count(method: MergeMethod, count: int, where: str) -> None:
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


def promote(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result
