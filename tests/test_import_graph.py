"""The project's modules import each other without a cycle: static imports anywhere in a module
(function-level ones included, ``if TYPE_CHECKING:`` blocks left out: they never run) and
"package.module[:attr]" strings, which registries such as ``BACKENDS`` and ``HEAD_KINDS`` import
at run time. And nothing outside ``jobs/demo`` (and ``bench``) imports the demo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("operators", "pipelines", "jobs", "bench")
MODULE_STRING = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+(?::\w+)?$")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def referenced(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Dotted names a module imports or names in a "module[:attr]" string (candidates: each may be
    a module, or an attribute of one)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.add(node.value.partition(":")[0])
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (each reference resolved to its longest module prefix)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for ref in referenced(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = ref.split(".")
            hit = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                       None)
            if hit is not None and hit != name and hit not in PACKAGES:
                targets.add(hit)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_cycles_are_found_in_a_hand_made_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_strings_relative_and_function_level_imports_count() -> None:
    source = ('import os\nfrom . import sibling\nfrom typing import TYPE_CHECKING\n'
              'if TYPE_CHECKING:\n    from jobs.never import X\n'
              'def f():\n    from operators.lm import engine\n'
              'TABLE = {"x": "operators.lm.torch_engine:TorchEngine", "note": "not operators here"}\n')
    refs = referenced(ast.parse(source), "operators.lm.stage", is_package=False)
    assert {"operators.lm.sibling", "operators.lm.engine", "operators.lm.torch_engine"} <= refs
    assert "jobs.never" not in refs and "jobs.never.X" not in refs


def test_registries_are_edges_of_the_graph() -> None:
    graph = import_graph()
    assert {"operators.lm.torch_engine", "operators.lm.vllm_engine",
            "operators.lm.vllm_logprobs"} <= graph["operators.lm.backends"]
    assert {"operators.detection.head", "operators.sae.head"} <= graph["operators.lm.head_specs"]
    assert "jobs.cli.run" in graph["jobs.cli.main"]  # COMMAND_MODULES


def test_no_import_cycle_among_project_modules() -> None:
    assert cycles(import_graph()) == []


def test_neither_lm_backend_imports_the_other() -> None:
    graph = import_graph()
    backends = {"operators.lm.torch_engine", "operators.lm.vllm_engine", "operators.lm.vllm_logprobs"}
    assert not {b: graph[b] & backends for b in backends if graph[b] & backends}


def test_no_production_module_imports_the_demo() -> None:
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith("jobs.demo"))
                 for m, targets in graph.items()
                 if not m.startswith(("jobs.demo", "bench")) and any(t.startswith("jobs.demo") for t in targets)}
    assert not offenders
