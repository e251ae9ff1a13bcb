"""The package has no import cycles, counting imports inside functions too: a module that imports one
which imports it back (as qwen/gptq.py and qwen/modeling.py once did) only works by the order things
happen to be imported in."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qwen"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The qwen modules ``path`` imports anywhere in its code (``from . import x`` counts as qwen.x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    # Importing qwen.a.b runs qwen/a/__init__.py first (not counted: qwen/__init__.py, which every module
    # shares, and the packages a module itself belongs to, which are being imported already).
    parents = {m.rsplit(".", k)[0] for m in found for k in range(1, m.count(".")) if m.startswith("qwen.")}
    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return {m for m in found | parents if m in modules and m != name and m not in own}


def test_no_import_cycles():
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: imports(path, set(paths)) for name, path in paths.items()}
    assert graph["qwen.modeling"] and "qwen.quantization.gptq_load" in graph["qwen.modeling"]  # the graph is real
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
