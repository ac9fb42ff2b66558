"""The map of docs/CONVENTIONS.md, checked: the library never imports the steps, no import cycles,
no module over 450 lines, and the rules every loader and writer follows.

Imports are read with `ast` (module-level and function-level alike: a lazy import is still a
dependency). `from pkg import name` counts as an import of `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT

LIBRARY = PROJECT_ROOT / "repro"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    rel = path.relative_to(PROJECT_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every `repro.*` / `steps.*` module that `path` imports, at any depth of the file."""
    out: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m.split(".")[0] in ("repro", "steps")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        parents = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")))}
        # a package's own __init__ is imported on the way to its modules: not a dependency to count
        graph[name] = {m for m in _imports(path, modules) if m in modules and m not in parents and m != name}
    return graph


def test_the_library_never_imports_the_steps():
    offenders = {name: sorted(m for m in _imports(path, _modules()) if m.startswith("steps"))
                 for name, path in _modules().items()}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_import_cycles_in_the_library():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other must be reported."""
    pkg = tmp_path / "repro"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from repro.b import g\n")
    (pkg / "b.py").write_text("from repro import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "LIBRARY", pkg)
    graph = _graph()
    assert graph["repro.a"] == {"repro.b"} and graph["repro.b"] == {"repro.a"}


def test_no_module_is_longer_than_450_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_loaders_are_strict_and_weights_only():
    code = {p: p.read_text() for p in [*LIBRARY.rglob("*.py"), *(PROJECT_ROOT / "steps").rglob("*.py")]}
    assert not [p for p, s in code.items() if "strict=False" in s]
    calls = [(p, m.group(0)) for p, s in code.items() for m in re.finditer(r"torch\.load\([^)]*\)", s)]
    assert calls and all("weights_only=True" in c for _, c in calls), calls
