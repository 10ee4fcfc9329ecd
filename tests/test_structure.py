"""The package's imports flow one way: no module imports (directly or through others) a module that imports it."""

import ast
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names() -> dict[str, Path]:
    names = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the medxfer modules it imports anywhere in its body (function-level imports count too:
    they hide a dependency, they do not remove it)."""
    modules = module_names()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medxfer"):
                # ``from medxfer.models import weights`` imports the submodule; ``... import build_segmenter`` the package
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medxfer")]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    names = sorted(graph)
    index = {name: i for i, name in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, component = connected_components(adjacency, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for name, c in zip(names, component):
        groups.setdefault(int(c), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def test_the_checker_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "medxfer.records" in graph and graph["medxfer.finetune"]  # the graph was really built
    assert import_cycles(graph) == []


def test_run_records_do_not_depend_on_sweeps():
    graph = import_graph()
    assert not any(name.startswith("medxfer.sweep") for name in graph["medxfer.records"])
    assert not any(name.startswith("medxfer.sweep") for name in graph["medxfer.finetune"])
