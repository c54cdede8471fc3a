"""Saving and loading permutations, so that an alignment can be inspected and reused.

``.json``: readable, one list of indices per group, plus each group's size and block size.
``.safetensors``: one int64 tensor per group, the same group table in the header metadata;
compact for large models. Either way ``perm[i]`` is the old unit placed at position ``i``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_engine.align.spec import Permutations, PermutationSpec, check_permutations
from merge_engine.errors import SourceError

FORMAT = "mergebot-permutations/1"


def save_permutations(
    perms: Mapping[str, torch.Tensor], path: str | Path, spec: PermutationSpec | None = None
) -> Path:
    """Write ``perms`` to ``path`` (``.json`` or ``.safetensors``), checked against ``spec``."""
    path = Path(path)
    if spec is not None:
        check_permutations(spec, perms)
    groups = {
        name: {"size": int(p.numel()), "share": spec.groups[name].share if spec else 1}
        for name, p in perms.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        metadata = {"format": FORMAT, "groups": json.dumps(groups)}
        tensors = {name: p.long().contiguous() for name, p in perms.items()}
        save_file(tensors, str(path), metadata=metadata)
        return path
    document = {
        "format": FORMAT,
        "family": spec.family if spec else None,
        "groups": groups,
        "permutations": {name: p.long().tolist() for name, p in perms.items()},
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_permutations(path: str | Path, spec: PermutationSpec | None = None) -> Permutations:
    """Read permutations written by :func:`save_permutations`; with ``spec``, refuse any that
    do not fit it."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"no permutations file at {path}; give the path save_permutations wrote")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                found = (f.metadata() or {}).get("format")
                perms = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        else:
            document = json.loads(path.read_text())
            found = document.get("format")
            perms = {
                k: torch.tensor(v, dtype=torch.long) for k, v in document["permutations"].items()
            }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SourceError(
            f"{path} is not a permutations file ({error}); write it with save_permutations"
        ) from error
    if found != FORMAT:
        raise SourceError(f"{path} is not a {FORMAT} file; write it with save_permutations")
    if spec is not None:
        check_permutations(spec, perms)
    return perms
