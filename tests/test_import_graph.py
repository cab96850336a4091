"""lrpilot's modules import each other without cycles (issue 10: llm/base.py <-> its backends was the only one).

    python -m pytest -q tests/test_import_graph.py

Read from the source with ast: every `import` and `from ... import` anywhere in a module (function-level ones
included, since they are cycles too once called), between lrpilot's own modules. The registries' lazy
'module:attr' entries are strings, so registering a component adds no edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lrpilot"


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """{module: lrpilot modules it imports} for every .py under root (package __init__ = the package)."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in mods] + ([node.module] if any(s not in mods for s in subs) else [])
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "lrpilot"
    (pkg / "llm").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "llm" / "__init__.py").write_text("")
    (pkg / "llm" / "base.py").write_text("def make():\n    from lrpilot.llm.openai_backend import B\n")
    (pkg / "llm" / "openai_backend.py").write_text("from lrpilot.llm.base import make\n")
    assert cycles(import_graph(pkg)) == [["lrpilot.llm.base", "lrpilot.llm.openai_backend"]]
