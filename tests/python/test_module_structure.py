"""The package's modules import alone, without import cycles (lazy imports included), and no
module rewrites a docstring at import (issue 16, item 3)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import obc_native

PACKAGE = Path(obc_native.__file__).resolve().parent
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the CLI when imported
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["obc_native", *parts])] = path
    return found


MODULES = _modules()


def _needs_torch(name: str) -> bool:
    return name.startswith(("obc_native.torch", "obc_native.demo"))


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not _needs_torch(n)))
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    _import_alone(name)


# Importing torch takes seconds: by default only the subpackages, which import all their
# modules; each module alone with -m slow.
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("name", [
    n if n in ("obc_native.torch", "obc_native.demo") else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(MODULES) if _needs_torch(n)])
def test_each_torch_module_imports_alone_in_a_fresh_interpreter(name):
    _import_alone(name)


def _import_alone(name: str) -> None:
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"import {name} alone failed:\n{result.stderr}"


def _imported(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The package modules that an import statement in `module` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # `from pkg import sub` imports the submodule; `from pkg import name` needs pkg itself
    submodules = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
    return submodules if len(submodules) == len(node.names) else [target, *submodules]


def _is_module(name: str) -> bool:
    if name in MODULES:
        return True
    parts = name.split(".")[1:]  # a compiled module, e.g. obc_native._core
    return bool(parts) and any(PACKAGE.joinpath(*parts[:-1]).glob(parts[-1] + ".*.so")) or (
        bool(parts) and PACKAGE.joinpath(*parts[:-1], parts[-1] + ".pyi").exists())


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (functions included)."""
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _imported(module, node, path.name == "__init__.py")
                             if t in MODULES and t != module)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle_even_through_lazy_imports():
    graph = _import_graph()
    assert "obc_native._results" in graph["obc_native._api"]  # the graph sees the imports
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _doc_assignments(source: str, filename: str) -> list[int]:
    """Lines that assign a __doc__ (obj.__doc__ = / += ..., or a module-level __doc__ = ...)."""
    lines = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            if len(node.args) > 1 and getattr(node.args[1], "value", None) == "__doc__":
                lines.append(node.lineno)
        for target in targets:
            if (isinstance(target, ast.Attribute) and target.attr == "__doc__") or (
                    isinstance(target, ast.Name) and target.id == "__doc__"):
                lines.append(node.lineno)
    return lines


def test_no_module_assigns_a_docstring_at_import():
    patched = {name: lines for name, path in MODULES.items()
               if (lines := _doc_assignments(path.read_text(), str(path)))}
    assert patched == {}, f"docstrings patched at import (write them out in full): {patched}"


def test_docstring_check_sees_an_assignment():
    source = "def f():\n    '''{x}'''\nf.__doc__ = f.__doc__.replace('{x}', 'y')\ng.__doc__ += 'z'\n"
    assert _doc_assignments(source, "example.py") == [3, 4]
