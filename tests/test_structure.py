"""The package's shape: no import cycles between its modules, and every module imports on
its own, first in a fresh interpreter.

The graph is read from the source (``ast``), so a cycle fails here with its files and
lines before it fails at runtime in an import order no other test happens to use.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "corral"

#: Third-party packages a module may need that a user may not have installed (extras).
OPTIONAL = ("psycopg", "psycopg_pool", "asyncpg", "sqlalchemy", "redis", "django", "pytest_django")


#: Where an import statement is, in the order an edge keeps the first of (module level
#: beats in a function beats under TYPE_CHECKING).
WHERE = ("module level", "in a function", "under TYPE_CHECKING")


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    where: str  #: one of WHERE


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: Container[str]
) -> Iterator[str]:
    """The dotted names an import statement loads (``from p import x``: ``p.x`` when it
    is a module, else ``p``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: None if is_package else -1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    for alias in node.names:
        name = f"{base}.{alias.name}"
        yield name if name in modules else base


def _edges(name: str, path: Path, modules: Container[str], type_checking: bool) -> dict[str, Edge]:
    is_package = path.name == "__init__.py"
    edges: dict[str, Edge] = {}

    def visit(nodes: list[ast.stmt] | list[ast.AST], where: str) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, where)
                if type_checking:
                    visit(node.body, WHERE[2])
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(name, is_package, node, modules):
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):
                        dep = ".".join(parts[:i])
                        own_ancestor = name.startswith(dep + ".") and i < len(parts)
                        if dep in modules and dep != name and not own_ancestor:
                            edge = Edge(dep, node.lineno, where)
                            old = edges.get(dep, edge)
                            if WHERE.index(old.where) >= WHERE.index(where):
                                edges[dep] = edge
            inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(
                list(ast.iter_child_nodes(node)), WHERE[1] if inner and where == WHERE[0] else where
            )

    visit(ast.parse(path.read_text(), str(path)).body, WHERE[0])
    return edges


def graph(*, type_checking: bool = False) -> dict[str, dict[str, Edge]]:
    """module -> {module it imports: where}, for the package's own modules.

    Imports inside functions count (they run, later); ``if TYPE_CHECKING:`` blocks do
    not, unless *type_checking*. Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so
    those count too, except the importer's own ancestors (already running).
    """
    modules = _modules()
    return {name: _edges(name, path, modules, type_checking) for name, path in modules.items()}


def cycles(g: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(g):
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start = min(group)
        # Shortest way back to start inside the group (breadth first).
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(g[v]):
                if w == start:
                    found.append([*paths[v], start])
                    queue.clear()
                    break
                if w in group and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return found


def _describe(g: dict[str, dict[str, Edge]], cycle: list[str]) -> str:
    steps = []
    for a, b in itertools.pairwise(cycle):
        edge = g[a][b]
        steps.append(f"  {a} imports {b} (line {edge.line}, {edge.where})")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def _check(g: dict[str, dict[str, Edge]], what: str) -> None:
    found = cycles(g)
    assert not found, (
        f"import cycles ({what}); move what both sides need into a module below both:\n"
        + "\n".join(_describe(g, c) for c in found)
    )


def test_no_import_cycles() -> None:
    """Imports that run (module level and inside functions) form no cycle."""
    _check(graph(), "imports that run")


def test_no_import_cycles_in_type_annotations() -> None:
    """Nor with ``if TYPE_CHECKING:`` imports: a cycle there is the same tangle, only
    hidden from the interpreter (a Protocol in the lower module says what it needs)."""
    _check(graph(type_checking=True), "counting TYPE_CHECKING imports")


#: What each layer may import of corral besides itself (docs/architecture.md): the broker,
#: the throwaway server and the sandbox stand alone; only the plugin (and the top-level
#: modules: CLI, plugin entry point) joins them.
LAYERS = {
    "corral.broker": ("corral.errors", "corral._lazy", "corral._twins", "corral._lifecycle"),
    "corral.postgres": ("corral.errors", "corral._lifecycle"),
    "corral.sandbox": ("corral.errors", "corral._lazy", "corral._twins"),
}


def test_each_layer_imports_only_what_it_may() -> None:
    found = []
    for source, edges in graph(type_checking=True).items():
        for layer, allowed in LAYERS.items():
            if source != layer and not source.startswith(layer + "."):
                continue
            for target, edge in edges.items():
                inside = target == layer or target.startswith(layer + ".")
                if not inside and target not in allowed:
                    found.append(f"{source} imports {target} (line {edge.line}, {edge.where})")
    assert not found, "imports across layers (docs/architecture.md):\n" + "\n".join(found)


def test_the_checker_names_a_cycle() -> None:
    g = {
        "p.a": {"p.b": Edge("p.b", 3, WHERE[0])},
        "p.b": {"p.c": Edge("p.c", 5, WHERE[1])},
        "p.c": {"p.a": Edge("p.a", 7, WHERE[2])},
        "p.d": {"p.a": Edge("p.a", 1, WHERE[0])},
    }
    (cycle,) = cycles(g)
    assert cycle == ["p.a", "p.b", "p.c", "p.a"]
    assert "p.b imports p.c (line 5, in a function)" in _describe(g, cycle)


# A fresh interpreter per module would take seconds each. Instead one process imports
# every module (loading all they need from outside the package), forgets the package's
# own modules, and imports the package: what that loads is what importing any of its
# modules first runs (the package's __init__ always runs first). For each module still
# not loaded it forks a child that imports just that module, as a fresh interpreter would.
_IMPORT_EACH = textwrap.dedent(
    """
    import gc, importlib, json, os, sys, traceback
    modules, optional = sys.argv[1].split(), tuple(sys.argv[2].split())
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # the child says what
    for name in [m for m in sys.modules if m == "corral" or m.startswith("corral.")]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()  # the children's collections skip it all: no copy-on-write of the heap
    try:
        importlib.import_module("corral")
    except BaseException:
        print(json.dumps(["corral", 1, traceback.format_exc()]))
        sys.exit()
    for name in modules:
        if name in sys.modules:
            print(json.dumps([name, 0, "(imported with the package)"]))
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            status, text = 0, ""
            try:
                importlib.import_module(name)
            except ImportError as exc:
                missing = (exc.name or "").split(".")[0]
                if missing in optional:
                    status, text = 2, missing
                else:
                    status, text = 1, traceback.format_exc()
            except BaseException:
                status, text = 1, traceback.format_exc()
            os.write(write, text.encode())
            os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            text = pipe.read().decode()
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(json.dumps([name, status, text]))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_module_imports_first(tmp_path: Path) -> None:
    names = sorted(_modules())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORRAL_", "EPHEMERAL_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PYTHONPATH"] = str(SRC)
    # The parent compiles each module once, the children read that: the run may have no
    # bytecode cache (PYTHONDONTWRITEBYTECODE), and this one stays out of the source tree.
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, " ".join(names), " ".join(OPTIONAL)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    failed = []
    seen = set()
    for line in proc.stdout.splitlines():
        name, status, text = json.loads(line)
        seen.add(name)
        if status == 1:
            failed.append(f"{name}:\n{text}")
    assert seen == set(names)
    assert not failed, "modules that fail when imported first:\n" + "\n".join(failed)
