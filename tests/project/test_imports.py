"""The package's import graph: every module imports alone, and no module imports one that imports
it back (counting imports inside functions too, which hide a circle instead of removing it)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from helpers import REPO as ROOT

PKG = os.path.join(ROOT, "pymoe")


def _modules() -> dict[str, str]:
    """Dotted name -> file for every .py file of the package."""
    mods = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(dirpath, f)
    return mods


MODULES = _modules()


def _bound_names(path: str) -> set[str]:
    """Names a module's top level defines or imports."""
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _imports(name: str, path: str) -> set[str]:
    """The package modules that `name` imports, anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from p import x`: p's attribute x, else submodule p.x
                sub = f"{base}.{a.name}"
                if base in MODULES and a.name in _bound_names(MODULES[base]):
                    found.add(base)
                elif sub in MODULES:  # (an extension module such as _pymoe_c has no .py)
                    found.add(sub)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "pymoe.backend" in graph["pymoe"]  # the graph is really read (guards the parser)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_module_imports_alone(name):
    """Each module in a fresh interpreter, so that import order in one process cannot hide a
    module that only works when another was imported first."""
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
