"""The house's shape: its import graph, read from the source, has no cycle, few floors, and
dependencies that point one way between the wings (README, "Layout")."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softtargets"

#: a wing may import its own modules and the wings below it, never one above
WING_FLOORS = {
    "errors": 0,
    "config": 1,
    "files": 1,
    "extras": 1,
    "distributed": 1,
    "data": 2,
    "losses": 3,
    "store": 3,
    "training": 4,
    "run": 5,
    "studies": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 9,
}
MAX_FLOORS = 10
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports anywhere (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from a.b import c``: module a.b.c if there is one, else a.b
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [sub if sub in MODULES else node.module for sub in subs]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle() -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


#: the rooms of the house as a newcomer draws it: each wing (folder) and each top-level module
ROOMS = {name: "softtargets." + wing(name) for name in MODULES}
ROOM_GRAPH = {
    room: {ROOMS[b] for a in MODULES if ROOMS[a] == room for b in GRAPH[a]} - {room}
    for room in set(ROOMS.values())
}


@cache
def floor(room: str) -> int:
    """1 for a room that imports no other; else one above the highest room it imports."""
    return 1 + max((floor(r) for r in ROOM_GRAPH[room]), default=0)


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_is_found_from_the_source() -> None:
    # the reader must see the imports it judges: a known edge and a function-level one
    assert "softtargets.errors" in GRAPH["softtargets.config"]
    assert "softtargets.run.distill" in GRAPH["softtargets.cli.launch"]  # imported lazily there
    assert len(MODULES) > 40


def test_wings_depend_only_on_the_wings_below() -> None:
    upward = [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if WING_FLOORS[wing(b)] > WING_FLOORS[wing(a)]
    ]
    assert not upward, "imports that point up: " + ", ".join(sorted(upward))


def test_the_house_has_at_most_ten_floors() -> None:
    tallest = max(ROOM_GRAPH, key=floor)
    assert floor(tallest) <= MAX_FLOORS, f"{tallest} stands on floor {floor(tallest)}"


def test_no_source_file_is_over_500_lines() -> None:
    long = {
        name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_every_module_says_what_it_owns() -> None:
    missing = [
        name for name, p in MODULES.items() if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_public_api_is_importable_from_the_package_without_torch() -> None:
    import subprocess
    import sys

    import softtargets

    for name in softtargets.__all__:
        assert getattr(softtargets, name) is not None, name
    assert softtargets.fit.__module__ == "softtargets.training.fit"
    code = "import sys, softtargets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
