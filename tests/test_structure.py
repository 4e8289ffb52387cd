"""The package's structure, checked from the source: no private name crosses a module boundary, no import
cycle among fastvl's modules, the dispatch layer never imports the ops it dispatches, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastvl": ROOT / "fastvl", "fastvl.kernels": ROOT / "kernels", "fastvl.benchmarks": ROOT / "benchmarks"}
SCANNED = ("fastvl", "fastvl.kernels")  # the library; benchmarks and tests are its users


def _modules() -> dict[str, Path]:
    """Every module of the scanned packages by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for pkg in SCANNED:
        base = PACKAGES[pkg]
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if any(part.startswith(".") for part in rel.parts):
                continue
            parts = [pkg] + [p for p in rel.parts if p != "__init__"]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _allowed(importer: str, owner: str, name: str) -> bool:
    """A private *module* may be used anywhere inside its own package; a private attribute nowhere else."""
    return f"{owner}.{name}" in MODULES and _inside(importer, owner)


def _private_uses(module: str, tree: ast.Module) -> list[str]:
    found = []
    bound: dict[str, str] = {}  # local name -> fastvl module it holds
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES or a.name.split(".")[0] == "fastvl":
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            owner = _resolve(module, node)
            if owner not in MODULES:
                continue
            for a in node.names:
                if _private(a.name) and not _allowed(module, owner, a.name):
                    found.append(f"{module}:{node.lineno} imports {owner}.{a.name}")
                if f"{owner}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{owner}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in bound:
                continue
            owner = ".".join([bound[value.id], *reversed(chain)])
            if owner in MODULES and owner != module and not _allowed(module, owner, node.attr):
                found.append(f"{module}:{node.lineno} reads {owner}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module_boundary():
    found = []
    for module, path in MODULES.items():
        found += _private_uses(module, ast.parse(path.read_text(), str(path)))
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def _module_level_imports(module: str, tree: ast.Module) -> set[str]:
    """The fastvl modules ``module`` imports when it is imported (not inside functions, not for type checking)."""
    out = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                owner = _resolve(module, node)
                for a in node.names:
                    if f"{owner}.{a.name}" in MODULES:
                        out.add(f"{owner}.{a.name}")
                    elif owner in MODULES:
                        out.add(owner)

    visit(tree.body)
    out.discard(module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle():
    graph = {m: _module_level_imports(m, ast.parse(p.read_text(), str(p))) for m, p in MODULES.items()}
    assert not _cycles(graph), f"import cycles among fastvl's modules: {_cycles(graph)}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", ["fastvl.backends", "fastvl.capabilities", "fastvl.rules", "fastvl.validate"])
def test_dispatch_layer_imports_nothing_above_it(layer):
    """The registry and the shared rules sit below the ops: not even a lazy import reaches back up."""
    tree = ast.parse(MODULES[layer].read_text())
    above = ("fastvl.ops", "fastvl.nn", "fastvl.models", "fastvl.train", "fastvl.data", "fastvl.cli")
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [_resolve(layer, n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [
        f"{_resolve(layer, n)}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    ]
    assert not [m for m in imported if any(_inside(m, a) for a in above)]


@pytest.mark.parametrize(
    "module",
    [m for m in MODULES if m.startswith(("fastvl.ops", "fastvl.nn", "fastvl.models"))]
    + ["fastvl.backends", "fastvl.capabilities", "fastvl.rules", "fastvl.validate", "fastvl.env", "fastvl.testing"],
)
def test_module_is_small(module):
    """One module, one job: the op layer's modules stay under ~450 lines."""
    assert len(MODULES[module].read_text().splitlines()) <= 450


def test_models_reach_the_ops_through_layers_only():
    """fastvl.models.layers is the models' one contact with fastvl.ops and fastvl.nn."""
    found = []
    for module, path in MODULES.items():
        if not module.startswith("fastvl.models.") or module == "fastvl.models.layers":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                owner = _resolve(module, node)
                names = [owner] + [f"{owner}.{a.name}" for a in node.names]
            found += [
                f"{module}:{node.lineno} {n}" for n in names if _inside(n, "fastvl.ops") or _inside(n, "fastvl.nn")
            ]
    assert not found, found
