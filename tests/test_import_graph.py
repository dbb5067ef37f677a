"""The package's import graph: no cycles, imports inside functions included.

Dependencies point one way (errors at the bottom, the commands at the top), so
that any module can be imported, tested and reasoned about without the ones
above it. The graph is read from the source with `ast`, not by importing.
"""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "stl10_keras"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, name: str, is_package: bool,
               modules: set[str]) -> set[str]:
    """The modules of `modules` that module `name` imports anywhere in `source`.

    An import under `if TYPE_CHECKING:` never runs and is left out; an import
    of a package that contains `name` (a package re-exporting its modules) is
    not a dependency of design.
    """
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the submodule when there is one.
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from m import function`
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py",
                             set(files))
            for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_imports_inside_functions_and_relative_ones():
    modules = {"stl10_keras.train", "stl10_keras.errors", "stl10_keras.serving.rest",
               "stl10_keras.serving.errors"}
    source = ("import os\n"
              "def f():\n    from stl10_keras import train\n"
              "class C:\n    def g(self):\n        from .errors import one_line\n")
    assert imports_of(source, "stl10_keras.serving.rest", False, modules) == {
        "stl10_keras.train", "stl10_keras.serving.errors"}
    assert imports_of("from .. import errors\n", "stl10_keras.serving.rest", False,
                      modules) == {"stl10_keras.errors"}
    typing_only = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from stl10_keras import train\n")
    assert imports_of(typing_only, "stl10_keras.errors", False, modules) == set()


def test_the_package_has_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_errors_imports_nothing_of_the_project():
    assert graph()["stl10_keras.errors"] == set()
