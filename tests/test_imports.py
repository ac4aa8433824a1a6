"""The library's import graph has no cycle, and every module imports in a fresh process.

The graph is read from the source (ast), not from what happens to be imported at run time: every
`import` and `from ... import` of a blip2_dist module counts, at module level or inside a function
(a deferred import is still a dependency, and the usual way a cycle hides).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import REPO

PACKAGE = REPO / "blip2_dist"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The blip2_dist modules `path` imports: `from blip2_dist import dist` names the submodule
    `blip2_dist.dist`; `from blip2_dist.data.shards import MANIFEST` the module `blip2_dist.data.shards`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_reader_reads_imports():
    graph = import_graph()
    assert "blip2_dist.dist" in graph["blip2_dist.checkpoint"]  # from blip2_dist import dist
    assert "blip2_dist.data.shards" in graph["blip2_dist.data.reader"]  # from blip2_dist.data.shards import ...
    assert "blip2_dist.io" in graph["blip2_dist.checkpoint"]
    assert "blip2_dist.evaluate" in graph["blip2_dist.train"]  # imported inside Trainer.evaluate


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_process():
    names = sorted(library_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_public_api_is_lazy_and_complete():
    """`import blip2_dist` loads no torch; every name of __all__ resolves to what its module defines;
    the README's code map names every one of them."""
    code = (
        "import sys, blip2_dist; assert 'torch' not in sys.modules, 'torch at import';"
        "import importlib;"
        "[print(n) for n in blip2_dist.__all__ if getattr(blip2_dist, n) is not "
        "getattr(importlib.import_module('blip2_dist.' + blip2_dist._API[n]), n)]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr + proc.stdout
    import blip2_dist

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [n for n in blip2_dist.__all__ if n not in readme]
    assert not missing, f"README's code map lacks {missing}"
    with pytest.raises(AttributeError):
        blip2_dist.no_such_name  # noqa: B018
    submodules = {p.stem for p in Path(blip2_dist.__file__).parent.glob("*.py")} | {"data"}
    assert not submodules & set(blip2_dist.__all__), "an API name would shadow a submodule"
