"""Imports flow one way (``pipeline -> jobs -> dataprep -> cluster``) with no file-level circles.

A static scan of every module's import statements (module level and inside functions; imports under
``if TYPE_CHECKING:`` are for annotations only and not counted), and one fresh interpreter that imports
every module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"pipeline": 3, "jobs": 2, "dataprep": 1, "cluster": 0}  # a module imports its own layer or lower ones

# Function-local imports that would close a circle at module level: each one is a debt (move the shared
# piece down a module), listed here so that no new one appears unnoticed and a paid one is struck off.
KNOWN_LOCAL_CIRCLES: set[tuple[str, str]] = set()


def _modules() -> dict[str, str]:
    out = {}
    for pkg in LAYERS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> list[tuple[str, bool, int]]:
    """(imported project module, at module level?, line) of every import statement in ``path``."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.Import):
                found.extend((t, top, child.lineno) for a in child.names if (t := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.extend((t, top, child.lineno) for a in child.names if (t := resolve(f"{base}.{a.name}")))
            else:
                visit(child, top)

    visit(ast.parse(open(path).read(), path), True)
    return [(t, top, line) for t, top, line in found if t != name]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module-level import graph, every function-local import as (module, target, line))."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local = []
    for name, path in modules.items():
        for target, top, line in _imports(name, path, modules):
            if top:
                graph[name].add(target)
            else:
                local.append((name, target, line))
    return graph, local


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_import_goes_down_the_layers():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target, top, line in _imports(name, path, modules):
            if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]:
                upward.append(f"{path}:{line} imports {target} ({'module level' if top else 'in a function'})")
    assert upward == [], "imports flow pipeline -> jobs -> dataprep -> cluster:\n" + "\n".join(upward)


def test_no_module_level_import_circle():
    graph, _ = _graph()
    circles = sorted(m for m in graph if m in _reach(graph, m))
    assert circles == [], f"modules on an import circle: {circles}"


def test_no_new_function_local_import_dodges_a_circle():
    graph, local = _graph()
    dodges = {(m, t) for m, t, _ in local if m in _reach(graph, t)}
    assert dodges - KNOWN_LOCAL_CIRCLES == set(), "a function-local import that would be a circle at module level"
    assert KNOWN_LOCAL_CIRCLES - dodges == set(), "paid off: strike it from KNOWN_LOCAL_CIRCLES"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
