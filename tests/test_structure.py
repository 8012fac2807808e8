"""The library's shape: no file over 450 lines, no function over 80, imports one-way between its rooms.

Rooms, lowest first; a module may import its own room and lower ones only. Imports inside function bodies
count (they are how heavy dependencies load lazily, and a lazy import is still a dependency). The KFP
components and pipelines (`components/`, `pipelines/`, shipped as `tgrl_lib.kfp_components` and
`tgrl_lib.kfp_pipelines`) are graph definitions over the step layer; their bodies run as separate KFP
tasks, so they are not part of the library's graph here (tests/test_components.py keeps them thin).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "tgrl_lib"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80
ROOMS = [  # lowest first
    {"errors", "progress", "env", "config", "recipe", "metrics_log"},
    {"data"},
    {"store", "scoring"},
    {"models"},
    {"generation", "filters"},
    {"rl", "evaluation"},
    {"mlops", "kfp_pipelines", "kfp_components"},
    {"steps"},
    {"commands", "cli"},
]
LEVEL = {room: level for level, rooms in enumerate(ROOMS) for room in rooms}


def module_name(path: Path) -> str:
    parts = ["tgrl_lib", *path.relative_to(LIB).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """The tgrl_lib modules `path` imports anywhere in its body (a `from pkg import module` counts as the
    module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("tgrl_lib")
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tgrl_lib")}
    return out


GRAPH = {name: imported(path) for name, path in MODULES.items()}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child] & graph.keys()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_a_planted_cycle():  # positive control for the test below
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_every_room_has_a_level():
    assert {room(m) for m in MODULES if room(m)} <= set(LEVEL)


def test_imports_never_go_up_a_room():
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if room(module) and room(target) in LEVEL and LEVEL[room(target)] > LEVEL[room(module)]
    ]
    assert upward == []


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_file_and_function_sizes(name):
    path = MODULES[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path} has {len(text.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f"{path}: {long}"
