"""The package's imports: each module imports alone without error or side effect, the
package-internal import graph (every import statement, also those inside functions) has no
cycle, and only the transport and the benchmarks import horovod or torch.distributed.

    pytest tests/test_imports.py
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deepimage"
# Where horovod and torch.distributed may be imported (docs/ARCHITECTURE.md, the layers).
COLLECTIVE_LIBRARIES = ("horovod", "torch.distributed")
MAY_IMPORT_COLLECTIVES = ("deepimage.parallel.transport", "deepimage.bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its __init__.py)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str, known: set[str] = frozenset()) -> set[str]:
    """Every dotted name an import statement anywhere in the file names, relative imports
    resolved: `import a.b` gives a.b; `from a import b` gives a.b, and a too unless a.b is one of
    the `known` modules (then a is only the package above it, like a.b's `import a.b`)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                found.add(f"{source}.{alias.name}")
                if f"{source}.{alias.name}" not in known:
                    found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (the named module itself, not the packages
    above it: a package's __init__ importing its own modules is not a cycle)."""
    mods = modules()
    return {name: {n for n in imported_names(path, name, set(mods)) if n in mods and n != name}
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "deepimage.parallel.lazy" in graph["deepimage.parallel"]
    found = cycles(graph)
    described = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in found]
    assert found == [], "import cycles (each edge of each):\n" + "\n".join(described)


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    """The graph reads imports inside functions too (a hidden edge is still an edge)."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    graph = {"a": {n for n in imported_names(tmp_path / "a.py", "a") if n in ("a", "b")},
             "b": {n for n in imported_names(tmp_path / "b.py", "b") if n in ("a", "b")}}
    assert cycles(graph) == [["a", "b"]]


def test_only_the_transport_and_the_benchmarks_import_horovod_or_torch_distributed():
    offenders = []
    for name, path in modules().items():
        if name.startswith(MAY_IMPORT_COLLECTIVES):
            continue
        for n in sorted(imported_names(path, name)):
            if any(n == lib or n.startswith(lib + ".") for lib in COLLECTIVE_LIBRARIES):
                offenders.append(f"{name} imports {n}")
    assert offenders == []


# Run in one child process: the third-party libraries every module shares are imported first
# (so that each fork does not pay for them again), then each package module is imported alone in
# a fork of its own, which reports an error, a changed environment or a thread left running.
_IMPORT_EACH = r"""
import importlib, json, os, sys, threading, traceback
for lib in ("numpy", "torch", "yaml", "pyarrow", "PIL.Image", "jsonschema", "mlflow", "matplotlib"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
results = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        env, threads = dict(os.environ), threading.active_count()
        try:
            importlib.import_module(name)
            changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
            out = {"error": None, "env": changed, "threads": threading.active_count() - threads}
        except BaseException:
            out = {"error": traceback.format_exc(limit=-3), "env": [], "threads": 0}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(text) if text else {"error": f"exited with status {status}", "env": [], "threads": 0}
print(json.dumps(results))
"""


def test_each_module_imports_alone_without_side_effects():
    """Each module imported alone (a fresh fork per module): no error, no environment variable
    set or changed, no thread started."""
    names = sorted(modules())
    # A fresh environment: this process's may already hold what a module imported here has set.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "LANG", "TMPDIR") if k in os.environ}
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(results) == names
    failed = {n: v["error"] for n, v in results.items() if v["error"]}
    assert failed == {}, "\n".join(f"{n}:\n{e}" for n, e in failed.items())
    side_effects = {n: {"environment": v["env"], "threads": v["threads"]} for n, v in results.items()
                    if v["env"] or v["threads"] > 0}
    # where each comes from: the modules none of whose package imports has the side effect itself
    graph = import_graph()
    own = sorted(n for n in side_effects if not any(m in side_effects for m in reachable(graph, n)))
    assert side_effects == {}, (f"import-time side effects of {own} (and of every module importing them): "
                                + "; ".join(f"{n}: {side_effects[n]}" for n in own))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others."""
    seen, todo = set(), list(graph[start])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n])
    return seen
