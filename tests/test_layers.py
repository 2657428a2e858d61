"""The layers hold: `psm_model` (PyTorch, no Ray) <- `pipelines` (Ray Data) <- `jobs` (Ray
Train/Tune, MLflow, CLI) <- `benchmarks`, and no two modules import each other, directly or round
a loop. Read from the source with `ast`, so an import inside a function counts as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("psm_model", "pipelines", "jobs", "benchmarks")  # each may import those before it
# third-party packages a layer must not use (MLflow lives in jobs.tracking only)
BANNED = {"psm_model": {"ray", "mlflow"}, "pipelines": {"mlflow"}}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the layers (a package as its __init__)."""
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) of every import in the file, at any depth; `from a import b`
    gives `a.b` when that is a module of ours, else `a`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.append((child if child in MODULES else node.module, node.lineno))
    return out


def _internal(name: str) -> str | None:
    """The module of ours `name` refers to (itself or its nearest parent), if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_internal(name) for name, _ in _imports(path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def test_the_layers_are_found():
    assert {"psm_model.hrnet", "pipelines.evaluate", "jobs.train"} <= set(MODULES)


def test_no_layer_imports_a_layer_above_it_or_a_banned_package():
    wrong = []
    for module, path in MODULES.items():
        layer = module.split(".")[0]
        above = set(LAYERS[LAYERS.index(layer) + 1 :])
        for name, line in _imports(path):
            top = name.split(".")[0]
            if top in above or top in BANNED.get(layer, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
    assert not wrong, "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []
