"""How much recipe the engine reads, and a YAML loader that keeps to it.

A recipe is text from strangers (the bot reads it from Hub discussions), so before building any
Python object the loader bounds what YAML could make of it: the text's size, how deep it nests
(PyYAML composes and constructs recursively, so thousands of ``[`` end in RecursionError) and
how many values it expands to (an alias reuses a node, so a few hundred bytes of nested aliases
expand to billions of values: "billion laughs"). Only the safe loader is ever used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any

import yaml

from merge_engine.errors import RecipeError, excerpt


@dataclass(frozen=True)
class RecipeLimits:
    """The most a recipe may hold; each refusal names the limit and its value."""

    max_bytes: int = 256 * 1024
    """Size of the recipe text in UTF-8: real recipes are a few KiB."""
    max_depth: int = 32
    """Nesting of mappings and lists, aliases expanded; the deepest recipe field nests about 8."""
    max_nodes: int = 50_000
    """YAML values (mappings, lists and scalars) once every alias is expanded."""
    max_examples: int = 1024
    """Inline calibration examples per calibration block; more belong in a Hub dataset."""
    max_example_chars: int = 8192
    """Characters of one inline example (a dict example: of its JSON)."""
    max_name_chars: int = 256
    """Characters of any model or dataset reference and any other string field or parameter
    name; Hub repo ids have at most 96 per part."""
    max_patterns: int = 64
    """Patterns in a ``discard:`` list, checked before any is compiled; a real list names a few
    components or blocks."""
    max_pattern_chars: int = 512
    """Characters of one pattern, checked before it is compiled."""


DEFAULT_LIMITS = RecipeLimits()


def load_yaml(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> Any:
    """``yaml.safe_load(text)`` within ``limits``: size, then nesting from the parser's events
    (the parser is not recursive), then the expanded size of the composed nodes, and only then
    construct. YAML errors are reported with their line and column."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise RecipeError(
            f"the recipe is {size:,} bytes, more than the {limits.max_bytes:,} allowed; shorten it"
        )
    try:
        _check_parse_depth(text, limits.max_depth)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node, limits)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(error, "problem", None) or error)
        problem = problem if len(problem) <= 200 else excerpt(problem, 200)  # e.g. an alias name
        raise RecipeError(f"the recipe is not valid YAML{where}: {problem}") from None
    except RecipeError:
        raise
    except ValueError:  # the safe constructor's int() and date(): 5000 digits, month 13
        raise RecipeError(
            "the recipe holds a number or date YAML cannot read; fix it, or quote it if it is text"
        ) from None


def check_examples(examples: list, where: str, limits: RecipeLimits) -> None:
    """The inline ``examples`` of the data block at ``where`` (a calibration block, a search
    task's data) within the count and the characters per example that ``limits`` allow."""
    if len(examples) > limits.max_examples:
        raise RecipeError(
            f"has {len(examples):,} inline examples, more than the {limits.max_examples:,} "
            "allowed; put the data in a Hub dataset repo and name it in 'dataset'",
            field=f"{where}.examples",
        )
    for index, example in enumerate(examples):
        length = len(example if isinstance(example, str) else json.dumps(example, default=str))
        if length > limits.max_example_chars:
            raise RecipeError(
                f"is {length:,} characters long, more than the {limits.max_example_chars:,} "
                "allowed for one example; shorten it",
                field=f"{where}.examples[{index}]",
            )


def _too_deep(limit: int) -> RecipeError:
    return RecipeError(
        f"the recipe nests lists and mappings deeper than the {limit} levels allowed; flatten it"
    )


def _check_parse_depth(text: str, max_depth: int) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise _too_deep(max_depth)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expansion(root: yaml.Node, limits: RecipeLimits) -> None:
    """Values and nesting of the document with every alias expanded, computed once per node
    (an alias is the same node object as its anchor, so sizes multiply without expanding)."""
    cap = limits.max_nodes + 1  # sizes beyond the limit need not be exact
    measured: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in measured:
            return measured[key]
        if key in open_nodes:
            raise RecipeError(
                "the recipe has an alias (*name) inside its own anchor (&name), which expands "
                "without end; write the value out"
            )
        if isinstance(node, yaml.ScalarNode):
            return 1, 0
        open_nodes.add(key)
        children = (
            node.value if isinstance(node, yaml.SequenceNode) else chain.from_iterable(node.value)
        )
        size, depth = 1, 0
        for child in children:
            child_size, child_depth = measure(child)
            size, depth = min(size + child_size, cap), max(depth, child_depth)
        open_nodes.discard(key)
        measured[key] = (size, depth + 1)
        if depth + 1 > limits.max_depth:
            raise _too_deep(limits.max_depth)
        return measured[key]

    size, _ = measure(root)
    if size > limits.max_nodes:
        raise RecipeError(
            f"the recipe holds more than the {limits.max_nodes:,} values allowed, counting an "
            "alias (*name) as every value it repeats; shorten it"
        )
