"""The package's shape: no import cycles, strategy names in one registry, the models free
of torch.distributed. Read from the source with ``ast``, not by importing it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dwdp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo += child.orelse
                continue
            todo.append(child)


def _imports(path: Path) -> set[str]:
    """The dwdp modules a file imports, module-level or inside functions alike."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dwdp")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dwdp"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}  # `from .x import module`
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # An import of a.b.c loads a, a.b and a.b.c: edges to every package on the way
        # count only where that package's __init__ imports something (none here do much).
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "dwdp.cli" in graph and "dwdp.parallel.rank" in graph["dwdp.parallel.launch"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_cli_imports_it():
    importers = sorted(n for n, deps in _graph().items() if "dwdp.cli" in deps)
    assert importers == [], f"lower layers import the CLI: {importers}"


def test_strategy_names_live_in_the_registry():
    """Outside parallel/strategies.py no module spells a strategy's name: they use the
    registry (STRATEGIES, DP/DEP/DWDP) and its attributes (lockstep, grouped, ...)."""
    pattern = re.compile(r'"(dwdp|dep|dp)"')
    hits = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).as_posix() == "parallel/strategies.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not hits, "strategy names outside the registry:\n" + "\n".join(hits)


def test_models_know_nothing_of_parallelism():
    for path in (SRC / "models").rglob("*.py"):
        deps = _imports(path)
        text = path.read_text()
        assert "torch.distributed" not in text, path
        assert not any(d.startswith("dwdp.parallel") for d in deps), (path, deps)
