"""The house's import rules, read from the source with ``ast`` (nothing is imported):

- no import circle among the modules of ``service/``, nor among those of ``merge_engine/``;
- the engine imports nothing of the bot (``service``);
- the sandbox hub is a Hub, not part of the bot: it imports nothing of ``service`` outside
  itself, nor the engine;
- the bot's parts import one way: the process (``server``, ``cli``, ``demo``) → the Space and
  the API → intake → workflows → Hub client and verification → ``disk`` → ``settings`` and
  ``errors`` (docs/architecture.md).

Every import counts: at module level, inside functions and under ``if TYPE_CHECKING:`` (a
type-only import still ties two modules together). ``from pkg import name`` where ``name`` is a
submodule is an import of that submodule; an import of a package is one of its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "merge_engine")
SANDBOX = "service.sandbox_hub"

PARTS: dict[str, int] = {
    "service.errors": 0,
    "service.settings": 0,
    "service.disk": 1,
    "service.hub_client": 2,
    "service.verification": 2,
    "service.workflows": 3,
    "service.intake": 4,
    "service.space": 5,
    "service.api": 5,
    SANDBOX: 5,
    "service.demo": 6,
    "service.server": 7,
    "service.cli": 8,
    "service": 9,
}
"""Each part of the bot and its rank: a module may import a module of its own part, or of a
part of lower rank (the Space and the API import neither each other nor the sandbox hub, which
only the demo and the command start)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the two packages, by its dotted name."""
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {target for target in found if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def circles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """One circle through each strongly connected group of ``within``'s modules (Tarjan),
    followed by the group's other modules, which lie on further circles with it."""
    nodes = [n for n in graph if n == within or n.startswith(within + ".")]
    edges = {n: sorted(t for t in graph[n] if t in nodes) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges[node]:
                groups.append(group)

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    found = []
    for group in groups:
        circle = _circle_in(group, edges)
        found.append(circle + sorted(group - set(circle)))
    return found


def _circle_in(group: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in edges[node]:
            if target == start:
                return [*paths[node], start]
            if target in group and target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"no circle in {sorted(group)}")


def describe(found: list[list[str]]) -> str:
    """``a → b → a`` for each circle, and ``(with c, d)`` for the rest of its group."""
    texts = []
    for circle in found:
        end = circle.index(circle[0], 1) + 1
        rest = f" (with {', '.join(circle[end:])})" if circle[end:] else ""
        texts.append(" → ".join(circle[:end]) + rest)
    return "; ".join(texts)


def part_of(name: str) -> str:
    """The part of the bot ``name`` belongs to, or its package outside the bot."""
    if name.split(".")[0] != "service":
        return name.split(".")[0]
    return max((part for part in PARTS if name == part or name.startswith(part + ".")), key=len)


GRAPH = import_graph()


def test_no_import_circle_among_the_bots_modules():
    found = circles(GRAPH, "service")
    assert not found, f"import circles in service/: {describe(found)}"


def test_no_import_circle_among_the_engines_modules():
    found = circles(GRAPH, "merge_engine")
    assert not found, f"import circles in merge_engine/: {describe(found)}"


def test_the_engine_imports_nothing_of_the_bot():
    wrong = sorted(
        f"{name} → {target}"
        for name, targets in GRAPH.items()
        if name.startswith("merge_engine")
        for target in targets
        if target.split(".")[0] == "service"
    )
    assert not wrong, f"the engine imports the bot: {', '.join(wrong)}"


def test_the_sandbox_hub_imports_nothing_of_the_bot():
    wrong = sorted(
        f"{name} → {target}"
        for name, targets in GRAPH.items()
        if part_of(name) == SANDBOX
        for target in targets
        if part_of(target) != SANDBOX
    )
    assert not wrong, f"the sandbox hub imports the bot: {', '.join(wrong)}"


def test_the_bots_parts_import_one_way():
    wrong = sorted(
        f"{name} → {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] == "service"
        for target in targets
        if target.split(".")[0] == "service"
        and part_of(target) != part_of(name)
        and PARTS[part_of(target)] >= PARTS[part_of(name)]
    )
    assert not wrong, f"imports against the direction of the parts: {', '.join(wrong)}"


def test_the_check_sees_imports_inside_functions_and_from_a_package(tmp_path):
    """The reader itself: a function-level ``from pkg import submodule`` is an edge to the
    submodule, and ``from pkg import name`` one to the package's ``__init__``."""
    path = tmp_path / "mod.py"
    path.write_text(
        "def f():\n    from service.workflows import steps\n    from service import errors\n"
        "from service.workflows import job_store as store\nimport service.intake\n"
    )
    known = {"service", "service.errors", "service.intake", "service.workflows"}
    known |= {"service.workflows.steps", "service.workflows.job_store"}
    assert imports_of("service.x", path, known) == {
        "service.workflows.steps",
        "service.errors",
        "service.workflows.job_store",
        "service.intake",
    }
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph, "a") == []  # only modules named a or a.* are looked at
    assert describe(circles({"p.a": {"p.b"}, "p.b": {"p.a"}}, "p")) == "p.a → p.b → p.a"
