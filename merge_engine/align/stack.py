"""Specs for plain stacks: ``nn.Sequential``-like MLPs and small CNNs, read off the modules in
the order they are registered (which must be the order they run).

Every Linear/Conv2d but the last produces a group: its output rows and bias, the normalisation
that follows it (BatchNorm1d/2d weight, bias and running statistics; a LayerNorm over the
units), and the next weight layer's input columns. Where a Flatten turns C feature maps of H×W
into C·H·W features, the next Linear's columns move in runs of H·W. Parameter-free modules
(activations, pooling, dropout, flatten) pass the units through unchanged. The first layer's
inputs and the last layer's outputs stay fixed. Residual connections are not understood.
"""

from __future__ import annotations

from torch import nn

from merge_engine.align.spec import Axis, Group, PermutationSpec, Probe
from merge_engine.errors import IncompatibleModelsError

_WEIGHTS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Dropout)  # not an activation to probe


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTS)]


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def _input_axis(group: str | None, size: int, layer_name: str, layer: nn.Module) -> Axis | None:
    if group is None:
        return None
    inputs = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise IncompatibleModelsError(
            f"{layer_name} is a grouped convolution, which the stack spec cannot permute; "
            f"write a PermutationSpec by hand"
        )
    if inputs % size:
        raise IncompatibleModelsError(
            f"{layer_name} takes {inputs} inputs, not a multiple of the {size} units before it; "
            f"only Linear/Conv2d stacks with Flatten between them are understood"
        )
    return Axis(group, unit=inputs // size)


def sequential_spec(model: nn.Module) -> PermutationSpec:
    """The spec of an MLP or small CNN (Linear/Conv2d with optional norms between)."""
    layers = weight_layers(model)
    if len(layers) < 2:
        raise IncompatibleModelsError(
            "the model has fewer than two Linear/Conv2d layers, so it has no hidden units to align"
        )
    last = layers[-1][0]
    groups: dict[str, Group] = {}
    axes: dict[str, tuple[Axis | None, ...]] = {}
    probes: dict[str, Probe] = {}
    current: str | None = None  # the group the data flowing here is laid out in
    for name, module in _leaves(model):
        prefix = f"{name}."
        if isinstance(module, _WEIGHTS):
            size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            new = None if name == last else f"{name}.out"
            inputs = _input_axis(current, groups[current].size if current else 1, name, module)
            spatial = (None,) * (module.weight.dim() - 2)
            out_axis = Axis(new) if new else None
            axes[prefix + "weight"] = (out_axis, inputs, *spatial)
            if module.bias is not None:
                axes[prefix + "bias"] = (out_axis,)
            if new:
                groups[new] = Group(size)
                probes[new] = Probe(name, dim=1 if isinstance(module, nn.Conv2d) else -1)
            current = new
        elif isinstance(module, _NORMS):
            axis = Axis(current) if current else None
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise IncompatibleModelsError(
                    f"{name} normalises over {tuple(module.normalized_shape)}, not over one axis "
                    f"of units; only LayerNorm over the last axis is understood"
                )
            for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
                axes[prefix + key] = (axis,) if tensor.dim() == 1 else ()
            if current:
                probes[current] = Probe(name, dim=probes[current].dim)
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            raise IncompatibleModelsError(
                f"{name} ({type(module).__name__}) holds weights the stack spec does not "
                f"understand; use Linear, Conv2d, BatchNorm or LayerNorm, or write a spec by hand"
            )
        elif current and not isinstance(module, _RESHAPES):
            probes[current] = Probe(name, dim=probes[current].dim)
    _check_complete(model, axes)
    return PermutationSpec(groups, axes, probes, family="stack")


def _check_complete(model: nn.Module, axes: dict) -> None:
    for name in model.state_dict():
        if name not in axes:
            raise IncompatibleModelsError(
                f"{name} is not part of a Linear/Conv2d/norm stack; write a spec by hand"
            )
