"""``worker/`` as a map: folders layered one way, no import cycle, no Ray, nothing from
``benchmarks/``, one front door.

The graph is built from the source with ``ast``, so an import inside a function (a
lazy import) counts as much as one at the top of a module: a cycle that only closes at
run time is still a cycle for whoever reads the code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import worker

ROOT = Path(worker.__file__).parent


def _modules() -> dict[str, Path]:
    """``worker.engine.engine`` -> its file, for every module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The ``worker`` modules a module imports, wherever in it the import sits.
    ``from pkg import name`` targets ``pkg.name`` when that is a module, else ``pkg``."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.add(sub if sub in modules else node.module)
    return {t for t in targets if t in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text(), str(path)), modules) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from worker.engine import engine\n")
    assert _imports(tree, _modules()) == {"worker.engine.engine"}


def test_worker_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "worker.engine.engine" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in worker/: " + " -> ".join(cycle)


# Bottom to top: a module imports only from its own folder and the folders before it.
LAYERS = ("core", "params", "quant", "kv", "attention", "models", "lora", "budget", "packed",
          "generate", "parallel", "engine")


def _folder(module: str) -> str:
    return module.split(".")[1]


def _is_program(module: str) -> bool:
    """An entry point (``python -m``): it stands above every layer."""
    return module.rsplit(".", 1)[-1] in ("cli", "__main__")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up the layers, or into a program, as ``a -> b``."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for a, deps in sorted(graph.items()):
        if a == "worker":  # the front door, lazily over everything
            continue
        for b in sorted(deps):
            if _is_program(b):
                bad.append(f"{a} -> {b} (a program)")
            elif not _is_program(a) and rank[_folder(b)] > rank[_folder(a)]:
                bad.append(f"{a} -> {b} ({_folder(a)} is below {_folder(b)})")
    return bad


def test_the_folders_are_layered_one_way():
    """The bottom (config, errors, requests, device, memory: ``worker/core/``) imports no
    other folder, the engine (``worker/engine/``) is the top, and nothing imports up."""
    graph = import_graph()
    folders = {_folder(m) for m in graph if m != "worker" and not _is_program(m)}
    assert folders == set(LAYERS), "a folder of worker/ is missing from LAYERS"
    assert layer_violations(graph) == []
    assert {_folder(d) for m, deps in graph.items() if m.startswith("worker.core.")
            for d in deps} <= {"core"}


def test_the_layer_check_fails_on_an_upward_import():
    graph = {"worker.core.config": {"worker.generate.grammar"}, "worker.generate.grammar": set(),
             "worker.engine.engine": {"worker.budget.cli"}, "worker.budget.cli": set()}
    assert layer_violations(graph) == [
        "worker.core.config -> worker.generate.grammar (core is below generate)",
        "worker.engine.engine -> worker.budget.cli (a program)"]


def _importers_of(package: str) -> list[str]:
    """The modules of ``worker/`` that import ``package`` or one of its modules."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == package or n.startswith(package + ".") for n in names):
                found.append(name)
    return found


def test_worker_imports_nothing_from_benchmarks():
    assert _importers_of("benchmarks") == []


def test_worker_imports_no_ray():
    assert _importers_of("ray") == []
    assert _importers_of("torch")  # the check finds imports at all


def test_only_the_front_door_is_imported_from_worker_itself():
    """Inside ``worker/`` nothing imports the package ``worker`` (its lazy ``Engine``
    would close a cycle through everything); modules import where a name lives."""
    graph = import_graph()
    assert [name for name, deps in graph.items() if "worker" in deps] == []


def test_the_front_door():
    code = ("import sys\n"
            "from worker import EngineConfig, InvalidRequestError, EngineDeadError\n"
            "assert 'torch' not in sys.modules, 'the configuration imported torch'\n"
            "from worker import (Engine, SamplingParams, GenerationOutput, GenerationDelta,\n"
            "                    FinishReason, TokenLogprobs)\n"
            "import worker\n"
            "assert all(hasattr(worker, name) for name in worker.__all__)\n"
            "assert Engine.__module__ == 'worker.engine.engine'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
