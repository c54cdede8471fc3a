"""A recipe's ``slices``: layer ranges of the models, merged range by range and stacked in
order into one model, as mergekit does (frankenmerges, passthrough stacks)."""

from __future__ import annotations

from merge_engine.errors import IncompatibleModelsError, RecipeError
from merge_engine.plan.places import describe_layers, outside_position, position
from merge_engine.plan.resolve import InputGroup, TaskResolver, check_input_count
from merge_engine.recipe.parameters import Place, Scope
from merge_engine.recipe.schema import InputSlice, ModelReference
from merge_engine.sources import layers
from merge_engine.sources.inspection import ModelSource


def plan_slices(resolver: TaskResolver) -> list[tuple[ModelReference, int]]:
    """Each slice's layers merged in order into one stack, between the first slice's embeddings
    and the last slice's final norm and head; returns the model and input layer of each output
    layer."""
    recipe, method = resolver.recipe, resolver.method
    out_layer = 0
    layer_sources: list[tuple[ModelReference, int]] = []  # (model, input layer) per output layer
    body: list[tuple[str, tuple[int, ...], InputGroup]] = []
    for i, out_slice in enumerate(recipe.slices):
        base_ref = (out_slice.base_model or recipe.base_model) if method.base != "unused" else None
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
        check_input_count(method, len(inputs), f"slices[{i}].sources")
        for j, src in enumerate(sources):
            _check_layer_range(
                resolver, src.model, src.layer_range, f"slices[{i}].sources[{j}].layer_range"
            )
        template = resolver.sources[sources[0].model]
        prefix = _single_stack(template)
        length = sources[0].layer_range[1] - sources[0].layer_range[0]
        shared_scopes: list[Scope] = [
            (f"slices[{i}].parameters", out_slice.parameters),
            ("parameters", recipe.parameters),
        ]
        for offset in range(length):
            t = position(offset, length)
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

                group = InputGroup(
                    inputs=[
                        resolver.member(
                            s.model,
                            at(s),
                            shape,
                            output,
                            template.ref,
                            (f"slices[{i}].sources[{j}].parameters", s.parameters),
                        )
                        for j, s in inputs
                    ],
                    base=resolver.member(base_src.model, at(base_src), shape, output, template.ref)
                    if base_src
                    else None,
                    shared_scopes=shared_scopes,
                    place=Place(output, t),
                )
                body.append((output, shape, group))
            layer_sources.append((sources[0].model, source_layer))
            out_layer += 1
    _plan_outside_layers(resolver, before=True)
    for output, shape, group in body:
        resolver.resolve_task(output, shape, group)
    _plan_outside_layers(resolver, before=False)
    return layer_sources


def _plan_outside_layers(resolver: TaskResolver, before: bool) -> None:
    """Embeddings come from the first slice's models, final norm and head from the last slice's."""
    index = 0 if before else len(resolver.recipe.slices) - 1
    out_slice = resolver.recipe.slices[index]
    base_ref = (
        (out_slice.base_model or resolver.recipe.base_model)
        if resolver.method.base != "unused"
        else None
    )
    template = resolver.sources[out_slice.sources[0].model]
    names = [
        n
        for n in sorted(template.tensors, key=layers.sort_key)
        if not layers.split_layer(n) and layers.is_before_layers(n) == before
    ]
    scopes = [
        (f"slices[{index}].parameters", out_slice.parameters),
        ("parameters", resolver.recipe.parameters),
    ]
    for name in names:
        shape = template.tensors[name].shape
        group = InputGroup(
            inputs=[
                resolver.member(
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
            base=resolver.member(base_ref, name, shape, name, template.ref) if base_ref else None,
            shared_scopes=scopes,
            place=Place(name, outside_position(name)),
        )
        resolver.resolve_task(name, shape, group)


def _single_stack(source: ModelSource) -> str:
    counts = layers.layer_counts(source.tensors)
    if len(counts) != 1:
        raise IncompatibleModelsError(
            f"slices need a model with one stack of layers; {source.ref} has {describe_layers(counts)}"
        )
    return next(iter(counts))


def _check_layer_range(
    resolver: TaskResolver, ref: ModelReference, layer_range: tuple[int, int], where: str
) -> None:
    counts = layers.layer_counts(resolver.sources[ref].tensors)
    total = max(counts.values(), default=0)
    if layer_range[1] > total:
        raise RecipeError(
            f"{ref} has {total} layers, so [{layer_range[0]}, {layer_range[1]}) does not fit; the end must be at most {total}",
            field=where,
        )
