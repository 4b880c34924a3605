"""The package's import structure: no cycle between its parts, and deployment never loads the training stack.

Every ``import`` counts, also one inside a function (a lazy import that dodges a cycle is still a cycle).
A *part* is a first-level subpackage (``polykv_learn.learn``) or a first-level module (``polykv_learn.cache``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polykv_learn"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """Fully qualified names a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _part(qualified: str) -> str | None:
    bits = qualified.split(".")
    if bits[0] != "polykv_learn" or len(bits) < 2:
        return None
    candidate = PACKAGE / bits[1]
    if candidate.is_dir() or candidate.with_suffix(".py").is_file():
        return bits[1]
    return None


def part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _part(_module_name(path))
        if source is None:
            continue
        targets = {_part(q) for q in _imported(path)} - {None, source}
        graph.setdefault(source, set()).update(t for t in targets if t is not None)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_cycle_between_parts_of_the_package():
    graph = part_graph()
    assert {"deploy", "learn", "eval", "data", "cache"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between package parts: {' -> '.join(cycle)}"


def test_deploy_never_imports_learn_or_lightning_statically():
    for path in (PACKAGE / "deploy").rglob("*.py"):
        bad = {q for q in _imported(path) if q.startswith(("polykv_learn.learn", "lightning", "pytorch_lightning"))}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_importing_deploy_loads_neither_learn_nor_lightning():
    code = (
        "import sys, polykv_learn.deploy, polykv_learn.deploy.polykv, polykv_learn.deploy.artifact\n"
        "prefixes = ('polykv_learn.learn', 'lightning', 'pytorch_lightning')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import polykv_learn.deploy loaded {out}"
