"""python/obc_native/_core.pyi matches the compiled module: the same public names in _core,
_core.f32, _core.f64 and its classes, and the same argument names as pybind11 reports in each
function's signature line (issue 16, item 2).

When a binding is added or renamed, the failure names exactly what to add to or remove from
the stub."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import obc_native
from obc_native import _core

STUB = Path(obc_native.__file__).resolve().parent / "_core.pyi"
if not STUB.exists():  # an installed build keeps it next to the module, a dev build in python/
    STUB = Path(__file__).resolve().parents[2] / "python" / "obc_native" / "_core.pyi"


def _tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _stub_scopes() -> dict[str, dict[str, ast.AST]]:
    """Scope ("", "f32", "f64", class names) -> {public name: its stub node}."""
    tree = _tree()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    scopes: dict[str, dict[str, ast.AST]] = {"": {}}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            scopes[""][node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            scopes[""][name] = node
            # a submodule, typed as a Protocol class that lists its functions (else a constant)
            protocol = classes.get(ast.unparse(node.annotation))
            if protocol is not None:
                scopes[name] = {f.name: f for f in protocol.body if isinstance(f, ast.FunctionDef)}
    for name, node in classes.items():
        if not name.startswith("_"):
            members = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (item.name == "__init__" or not item.name.startswith("_")):
                    members[item.name] = item
            scopes[name] = members
    return scopes


def _module_scopes() -> dict[str, dict[str, object]]:
    scopes: dict[str, dict[str, object]] = {"": {n: getattr(_core, n) for n in _public(dir(_core))}}
    for name, obj in list(scopes[""].items()):
        if inspect.ismodule(obj):
            scopes[name] = {n: getattr(obj, n) for n in _public(dir(obj))}
        elif isinstance(obj, type) and not issubclass(obj, BaseException):
            members = {n: getattr(obj, n) for n in _public(vars(obj))}
            members["__init__"] = obj.__init__
            scopes[name] = members
    return scopes


def _qualified(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def test_stub_and_module_have_the_same_names():
    stub, module = _stub_scopes(), _module_scopes()
    missing = sorted(_qualified(s, n) for s in module for n in module[s] if n not in stub.get(s, {}))
    extra = sorted(_qualified(s, n) for s in stub for n in stub[s] if n not in module.get(s, {}))
    assert not missing and not extra, (
        f"python/obc_native/_core.pyi is out of date: add {missing} (in _core, missing from the "
        f"stub); remove {extra} (in the stub, not in _core)")


def _split_top_level(text: str) -> list[str]:
    """Splits at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def _doc_arguments(func, name: str) -> list[str] | None:
    """Argument names from pybind11's signature line ``name(a: T, b: T = d) -> R`` (None when
    the function has no such line, e.g. an overload set)."""
    first = (getattr(func, "__doc__", None) or "").split("\n", 1)[0]
    if not first.startswith(name + "(") or "*args" in first:
        return None
    inner, depth = [], 0
    for char in first[len(name) + 1:]:
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        inner.append(char)
    return [part.split(":")[0].split("=")[0].strip() for part in _split_top_level("".join(inner))]


def _stub_arguments(node: ast.FunctionDef) -> list[str]:
    return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]


def _callables():
    module, stub = _module_scopes(), _stub_scopes()
    for scope, members in module.items():
        for name, obj in members.items():
            node = stub.get(scope, {}).get(name)
            if isinstance(node, ast.FunctionDef) and callable(obj) and not isinstance(obj, type):
                yield pytest.param(scope, name, obj, node, id=_qualified(scope, name))


@pytest.mark.parametrize("scope, name, func, node", list(_callables()))
def test_argument_names_match(scope, name, func, node):
    documented = _doc_arguments(func, name)
    if documented is None:
        pytest.skip(f"{_qualified(scope, name)}: pybind11 gives no single signature line")
    stub_args = _stub_arguments(node)
    if scope in ("f32", "f64") or stub_args[:1] == ["self"]:
        stub_args = stub_args[1:]  # Protocol methods of the submodules, and instance methods
    if documented[:1] == ["self"]:
        documented = documented[1:]
    assert stub_args == documented, (
        f"python/obc_native/_core.pyi: {_qualified(scope, name)} takes {documented} in _core, "
        f"the stub says {stub_args}")


def test_exceptions_keep_their_base():
    for node in _tree().body:
        if isinstance(node, ast.ClassDef) and isinstance(getattr(_core, node.name, None), type):
            cls = getattr(_core, node.name)
            if issubclass(cls, BaseException):
                assert [ast.unparse(b) for b in node.bases] == [cls.__bases__[0].__name__], node.name


def test_the_check_sees_a_missing_name(monkeypatch):
    # the comparison is not vacuous: a binding unknown to the stub is reported by name
    monkeypatch.setattr(_core.f32, "gptq_example", lambda W: W, raising=False)
    with pytest.raises(AssertionError, match=r"add \['f32.gptq_example'\]"):
        test_stub_and_module_have_the_same_names()
