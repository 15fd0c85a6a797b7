"""guard's parts depend on each other in one direction: no import cycle between its subpackages.

Every import under guard/ counts, those inside functions too (a lazy import still ties two parts
together), except ``guard/__init__.py``'s lazy re-exports of the public names. A cycle makes a part
impossible to load, test or replace on its own; the serving path in particular must not reach back
into the offline tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

GUARD = Path(__file__).resolve().parents[1] / "guard"
SUBPACKAGES = {p.name for p in GUARD.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def _module(path: Path) -> str:
    return ".".join(("guard", *path.relative_to(GUARD).with_suffix("").parts)).removesuffix(".__init__")


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None


def _edges() -> dict[tuple[str, str], list[str]]:
    """``(from_room, to_room) -> ["module -> imported", ...]`` for every import that crosses rooms."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in GUARD.rglob("*.py"):
        if path == GUARD / "__init__.py":
            continue
        mod = _module(path)
        src = _room(mod)
        if src is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                dst = _room(t) if t.startswith("guard.") else None
                if dst is not None and dst != src:
                    edges.setdefault((src, dst), []).append(f"{mod} -> {t}")
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_walk_sees_the_known_dependencies():
    edges = _edges()
    assert ("cli", "scan") in edges and ("serving", "online") in edges and ("torchserve", "serving") in edges


def test_no_import_cycle_between_subpackages():
    edges = _edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycle = _cycle(graph)
    if cycle:
        where = "\n".join(f"  {a} -> {b}: {edges[(a, b)][0]}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n{where}")


def test_the_serving_path_does_not_reach_the_offline_tools():
    offline = {"scan", "bench", "cli", "demo", "audit", "purify"}
    crossing = [line for (a, b), lines in _edges().items() if a in {"online", "serving", "torchserve"}
                and b in offline for line in lines]
    assert crossing == []
