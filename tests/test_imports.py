"""The house: djepa's modules import each other one way (cli -> train -> models -> nn -> ops ->
dispatch/backends -> kernels | _C), with no cycle.

The import graph is read statically (ast), from every `import` / `from ... import` statement of
every module: at module level and inside functions, since a function-level import is a
dependency too (it only postpones the cycle to the first call). `from pkg import name` depends on
the submodule `pkg.name` where there is one, on the submodule that `pkg`'s lazy `_EXPORTS` table
names for `name` (djepa._lazy), else on `pkg` (its __init__ provides `name`); a parent package's
__init__ running first is not counted as a dependency.
"""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py installs kernels/ as djepa.kernels
PACKAGE_DIRS = {"djepa": ROOT / "djepa", "djepa.kernels": ROOT / "kernels"}

def module_files():
    """{module name: file} for every module of the package."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _absolute(module, is_package, level, name):
    """The absolute module name of a (possibly relative) import in `module`."""
    if level == 0:
        return name
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def lazy_exports(path):
    """A package __init__'s `_EXPORTS = {name: submodule}` table (djepa._lazy), else {}."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports_of(module, path, modules, exports=None):
    """The package's modules that `module` imports anywhere in its file (sorted). `exports`:
    {package: its lazy _EXPORTS table}."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    exports = exports or {}
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                lazy = exports.get(source, {}).get(alias.name)
                deps.add(sub if sub in modules else f"{source}.{lazy}" if lazy else source)
    return sorted(d for d in deps if d in modules and d != module)


@functools.lru_cache(maxsize=None)
def import_graph():
    """{module: the modules it imports} (cached: tests copy before changing it)."""
    modules = module_files()
    exports = {m: lazy_exports(p) for m, p in modules.items() if p.name == "__init__.py"}
    return {m: imports_of(m, path, modules, exports) for m, path in modules.items()}


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each as one cycle
    through all of its modules' edges found by a walk: [m0, m1, ..., m0]."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(comp, _one_cycle(graph, comp)) for comp in components]


def _one_cycle(graph, comp):
    """A shortest cycle through the component's smallest module."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in graph[path[-1]]:
            if w == start:
                return path + [start]
            if w in comp and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _show(cycle):
    return " -> ".join(m.removeprefix("djepa.") for m in cycle)


def test_the_graph_reader_finds_module_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\nimport pkg.sub.c\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n    return c\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("from ..a import name\nfrom pkg.sub import missing\n")
    (pkg / "d.py").write_text("import os\nfrom pkg import Lazy, other\n")
    (pkg / "e.py").write_text("")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.sub": pkg / "sub" / "__init__.py", "pkg.sub.c": pkg / "sub" / "c.py",
               "pkg.d": pkg / "d.py", "pkg.e": pkg / "e.py"}
    (pkg / "__init__.py").write_text("from x import lazy_exports\n_EXPORTS = {'Lazy': 'e'}\n")
    exports = {"pkg": lazy_exports(pkg / "__init__.py"), "pkg.sub": lazy_exports(pkg / "sub" / "__init__.py")}
    assert exports == {"pkg": {"Lazy": "e"}, "pkg.sub": {}}
    graph = {m: imports_of(m, p, modules, exports) for m, p in modules.items()}
    assert graph == {"pkg": [], "pkg.a": ["pkg.b", "pkg.sub.c"], "pkg.b": ["pkg.sub.c"],
                     "pkg.sub": ["pkg.a"], "pkg.sub.c": ["pkg.a", "pkg.sub"], "pkg.d": ["pkg", "pkg.e"],
                     "pkg.e": []}
    found = cycles(graph)
    assert len(found) == 1
    comp, cycle = found[0]
    assert comp == {"pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    assert cycle == ["pkg.a", "pkg.sub.c", "pkg.a"]  # the shortest through the smallest module
    assert cycles({"x": ["y"], "y": []}) == []


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert {"djepa.train", "djepa.cli", "djepa.models.djepa", "djepa.ops.denoise", "djepa.kernels.ema",
            "djepa.backends"} <= set(graph)
    assert "djepa.models.config" in graph["djepa.models.djepa"]  # module level
    assert "djepa.nn.ema" in graph["djepa.models.djepa"]          # in DJEPA.__init__: from djepa.nn import EMA
    assert "djepa.models.ema_schedule" in graph["djepa.models.djepa"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among djepa's modules:\n" + "\n".join(
        f"  {_show(cycle)}   (all of: {', '.join(sorted(comp))})" for comp, cycle in found)
