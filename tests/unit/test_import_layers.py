"""Imports flow one way: no module of either package imports, at any depth, a module that imports it back.

The graph counts every import statement (module level, inside functions, under TYPE_CHECKING), since
a deferred import is still a dependency, and a cycle hidden in a function is the one that
surfaces as a half-initialized module at run time.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "specops": ROOT / "workloads" / "specops",
    "specops_operator": ROOT / "operator" / "specops_operator",
}


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, resolving relative imports and `from pkg import module`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """The modules of one import cycle, sorted (empty when there is none): graphlib's own check."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return sorted(set(exc.args[1]))
    return []


def test_the_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(graph) == ["a", "b", "c"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_imports() -> None:
    graph = import_graph()
    # commands/evaluate imports the vLLM path inside main(), never at module level
    assert "specops.evaluate_vllm" in graph["specops.commands.evaluate"]
    assert "specops.eval_inputs" in graph["specops.evaluate_vllm"]


def test_no_import_cycles() -> None:
    assert cycle(import_graph()) == []
