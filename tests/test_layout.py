"""The package's architecture, checked on its source: no import cycles, no private names across subpackages.

Modules are read with ``ast`` (nothing is imported); every import counts, also
those inside functions, so a cycle cannot hide behind a lazy import.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "cif_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str):
    """``(target module, imported name or None)`` for every import in ``module``."""
    path = MODULES[module]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None) if sub in MODULES else (base, alias.name)


def _edges():
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A package's __init__ importing its own modules is how it re-exports, not a dependency back.
            if target and target != m and not (target.startswith(m + ".") or m.startswith(target + ".")):
                graph[m].add(target)
    return graph


def test_no_import_cycles():
    graph = _edges()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_no_private_names_across_subpackages():
    bad = []
    for m in MODULES:
        for target, name in _imports(m):
            if not target.startswith("cif_jax"):
                continue
            leaf = target.rpartition(".")[2] if name is None else name
            if leaf.startswith("_") and not leaf.startswith("__") and _subpackage(target) != _subpackage(m):
                bad.append(f"{m} imports {leaf} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["benchmarks", "experiments"])
def test_scripts_use_public_names_only(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cif_jax"):
                parts = node.module.split(".") + [a.name for a in node.names]
                bad += [f"{path.name}: {node.module} import {p}" for p in parts if p.startswith("_")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("cj", "cif_jax"):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    bad.append(f"{path.name}: cj.{node.attr}")
    assert not bad, "\n".join(bad)


def test_experiments_do_not_import_benchmarks():
    for path in (ROOT / "experiments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("benchmarks", "common") for n in names), path.name


def test_every_internal_import_resolves():
    """Also the lazy ones inside functions, which the test run reaches only if their branch is taken."""
    bad = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("cif_jax")):
                base = _resolve(m, path, node)
                if base not in MODULES:
                    bad.append(f"{m}: from {'.' * node.level}{node.module or ''} -> {base}")
    assert not bad, "\n".join(bad)


def test_workloads_are_a_leaf():
    """Nothing in the library imports the workloads (the CLI, the model zoo, the data loaders)."""
    bad = [f"{m} imports {target}" for m in MODULES if not m.startswith("cif_jax.workloads")
           for target, _ in _imports(m) if target.startswith("cif_jax.workloads")]
    assert not bad, "\n".join(bad)


#: The third-party packages the library (everything but the workloads) may import: the
#: dependencies of pyproject.toml, the standard library aside (scipy comes with jax).
LIBRARY_DEPENDENCIES = {"jax", "jaxlib", "flax", "optax", "equinox", "lineax", "numpy", "jaxtyping", "tqdm", "scipy"}


def test_library_imports_only_its_dependencies():
    import sys

    bad = []
    for m in MODULES:
        if m.startswith("cif_jax.workloads"):
            continue
        for target, _ in _imports(m):
            top = target.split(".")[0]
            if top and top != "cif_jax" and top not in sys.stdlib_module_names and top not in LIBRARY_DEPENDENCIES:
                bad.append(f"{m} imports {target}")
    assert not bad, "\n".join(bad)
