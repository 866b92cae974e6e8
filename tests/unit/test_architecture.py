"""The import graph of the library: no cycles, and every arrow points down the layers.

tasks → ops → adapters → basics; node/ imports nothing of ours. Imports inside functions
count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "fabdeploy"
LAYER = {"basics": 0, "adapters": 1, "ops": 2, "cli": 3, "tasks": 3, "__init__": 4}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` is an arrow to pkg.mod; `from mod import name`, to mod.
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for n in names:
                if n in mods and n != mod:
                    graph[mod].add(n)
    return graph


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return LAYER["__init__"]
    return LAYER[parts[1]]


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for mod, deps in _graph().items():
        if mod.startswith("fabdeploy.node"):
            wrong += [f"{mod} -> {d} (the node program imports nothing of ours)" for d in deps]
            continue
        for d in deps:
            if d.startswith("fabdeploy.node"):
                continue  # nodectl ships the node program's file; nothing imports it as code
            if d == "fabdeploy" or _layer(d) > _layer(mod):
                wrong.append(f"{mod} -> {d}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(sorted(wrong))


def test_every_module_sits_in_a_layer() -> None:
    for mod in _graph():
        if not mod.startswith("fabdeploy.node") and mod != "fabdeploy":
            assert mod.split(".")[1] in LAYER, (
                f"{mod} is in no layer: put it in basics/, adapters/, ops/"
            )
