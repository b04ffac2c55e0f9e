"""The house rules a reader relies on, checked from the source: imports go one way (no cycles inside the
package), no module grows into a framework, and the layers depend downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name; ``kernels/`` is installed as ``vit_fast.kernels``."""
    found = {}
    for root, prefix in ((REPO / "vit_fast", "vit_fast"), (REPO / "kernels", "vit_fast.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body (function-level imports too: a lazy
    import hides a cycle, it does not remove it)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule, else the package itself
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_inside_the_package():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "lower, upper",
    [("vit_fast.kernels", "vit_fast.ops"), ("vit_fast.kernels", "vit_fast.backends"),
     ("vit_fast.kernels", "vit_fast.model"), ("vit_fast.backends", "vit_fast.ops"),
     ("vit_fast.backends", "vit_fast.model"), ("vit_fast.ops", "vit_fast.model")],
)
def test_layers_depend_downwards_only(lower, upper):
    """model -> ops -> backends -> kernels: a lower layer never imports a higher one."""
    offenders = {
        name: sorted(m for m in _imports(name, path) if m == upper or m.startswith(upper + "."))
        for name, path in MODULES.items()
        if name == lower or name.startswith(lower + ".")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_over_600_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_test_file_over_600_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "tests").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_an_op_with_several_kernel_files_keeps_them_in_its_folder():
    """kernels/<op>.py, or kernels/<op>/ once its kernel families are files of their own: never kernels/<op>_*.py
    beside kernels/<op>.py."""
    flat = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if p.stem != "__init__")
    folders = sorted(p.name for p in (REPO / "kernels").iterdir() if (p / "__init__.py").is_file())
    assert [(a, b) for a in flat + folders for b in flat if b.startswith(a + "_")] == []
