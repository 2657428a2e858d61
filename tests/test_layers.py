"""The layers hold: `psm_model` (PyTorch, no Ray) <- `pipelines` (Ray Data) <- `jobs` (Ray
Train/Tune, MLflow, CLI) <- `benchmarks`, and no two modules import each other, directly or round
a loop. Read from the source with `ast`, so an import inside a function counts as one at the top,
and so does a module named by a string where `importlib.import_module` imports by name (the CLI's
table of commands). MLflow is imported by `jobs/tracking.py` alone, and no command module imports
another command module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("psm_model", "pipelines", "jobs", "benchmarks")  # each may import those before it
# third-party packages a layer must not use
BANNED = {"psm_model": {"ray", "mlflow"}, "pipelines": {"mlflow"}}
# the one upward import: `psm`, one command line for every command, imports the chosen one's
# module by name (its COMMANDS table), `psm bench ...` and `psm model-summary` included
UPWARD_BY_NAME = {("jobs.cli", "benchmarks")}
MLFLOW_MODULE = "jobs.tracking"
# the registered model's code: MLflow "models from code" runs this file to load the model, and it
# must subclass mlflow.pyfunc.PythonModel and call mlflow.models.set_model itself
MLFLOW_ALSO = {"jobs.registered_model"}


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
    """(imported dotted name, line) of every import statement in the file, at any depth;
    `from a import b` gives `a.b` when that is a module of ours, else `a`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.append((child if child in MODULES else node.module, node.lineno))
    return out


def _imports_by_name(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every string naming a module of ours, `module` or `module:function`, in a
    file that calls `importlib.import_module`: what it may import by name, whichever string it
    passes (`jobs/cli.py` looks the chosen command's module up in its COMMANDS table)."""
    tree = ast.parse(path.read_text(), str(path))
    calls = any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        for node in ast.walk(tree)
    )
    if not calls:
        return []
    return [
        (node.value.partition(":")[0], node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.partition(":")[0] in MODULES
    ]


def _internal(name: str) -> str | None:
    """The module of ours `name` refers to (itself or its nearest parent), if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_internal(name) for name, _ in _imports(path) + _imports_by_name(path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _commands() -> set[str]:
    """The command modules: those `jobs/cli.py: COMMANDS` names, and any module of jobs/ with an
    `add_arguments` (a command not yet in the table)."""
    named = {name for name, _ in _imports_by_name(MODULES["jobs.cli"])}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        if module.startswith("jobs.") and any(
            isinstance(node, ast.FunctionDef) and node.name == "add_arguments" for node in tree.body
        ):
            named.add(module)
    return named


def test_the_layers_are_found():
    assert {"psm_model.hrnet", "pipelines.validate", "jobs.train"} <= set(MODULES)


def test_the_strings_the_cli_imports_by_name_are_read():
    by_name = {name for name, _ in _imports_by_name(MODULES["jobs.cli"])}
    assert {"jobs.train", "jobs.evaluate", "benchmarks.model", "jobs.make_data"} <= by_name
    assert {"jobs.train", "jobs.evaluate", "benchmarks.model"} <= _graph()["jobs.cli"]
    assert _imports_by_name(MODULES["psm_model.hrnet"]) == []  # no import_module, no strings


def _wrong_imports(upward_by_name: set[tuple[str, str]]) -> list[str]:
    """Upward imports and banned packages, each as `file:line: what`; `upward_by_name` holds the
    (module, layer) pairs allowed to import upward by name."""
    wrong = []
    for module, path in MODULES.items():
        layer = module.split(".")[0]
        above = set(LAYERS[LAYERS.index(layer) + 1 :])
        for name, line in _imports(path):
            top = name.split(".")[0]
            if top in above or top in BANNED.get(layer, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
        for name, line in _imports_by_name(path):
            top = name.split(".")[0]
            if top in above and (module, top) not in upward_by_name:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name} by name")
    return wrong


def test_no_layer_imports_a_layer_above_it_or_a_banned_package():
    wrong = _wrong_imports(UPWARD_BY_NAME)
    assert not wrong, "\n".join(wrong)
    # the CLI's imports by name are read: without its exception, they are upward imports
    unexcused = _wrong_imports(set())
    assert unexcused and all(w.startswith("jobs/cli.py:") for w in unexcused)
    assert any(w.endswith("jobs imports benchmarks.model by name") for w in unexcused)


def test_mlflow_is_imported_by_jobs_tracking_alone():
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for module, path in MODULES.items()
        if module not in {MLFLOW_MODULE, *MLFLOW_ALSO}
        for name, line in _imports(path)
        if name.split(".")[0] == "mlflow"
    ]
    assert not wrong, "\n".join(wrong)
    assert any(n.split(".")[0] == "mlflow" for n, _ in _imports(MODULES[MLFLOW_MODULE]))


def test_no_command_module_imports_another():
    commands = _commands()
    assert {"jobs.train", "jobs.evaluate", "jobs.tune", "jobs.compare"} <= commands
    # shared by commands, not commands: the training driver (train, tune's trials, demo) and its
    # worker loop among them
    shared = {"jobs.cli", "jobs.command", "jobs.tracking", "jobs.training", "jobs.train_loop"}
    assert not shared & commands
    graph = _graph()
    wrong = [
        f"{MODULES[module].relative_to(ROOT)}: command {module} imports command {target}"
        for module in sorted(commands)
        if module.startswith("jobs.")
        for target in sorted(graph[module] & commands)
    ]
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
