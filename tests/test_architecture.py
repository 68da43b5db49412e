"""The package's shape: a declared layer order with no upward import and no cycle,
strategy names in one registry and branched on only there, the models free of
torch.distributed, the planner free of the runtime. Read from the source with ``ast``,
not by importing it (except the planner check, which imports it in a fresh process)."""

from __future__ import annotations

import ast
import re
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dwdp"

# Lowest first. A module may import its own layer and those below it, never one above.
# The longest matching prefix places a module (the root package "dwdp" only itself);
# every module must be placed.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dwdp", "dwdp.config", "dwdp.quant", "dwdp.batch", "dwdp.flops", "dwdp.sampling",
              "dwdp.ceilings", "dwdp.timing", "dwdp.errors", "dwdp.kernels")),
    # What the runtime, the memory count and the planner share about strategies: names,
    # configs, DWDP's placement, DEP's wire arithmetic.
    ("strategy arithmetic", ("dwdp.strategy.spec", "dwdp.strategy.placement", "dwdp.strategy.wire")),
    ("models", ("dwdp.models",)),
    ("model services", ("dwdp.checkpoint", "dwdp.presets", "dwdp.engine", "dwdp.kv_cache", "dwdp.decode",
                        "dwdp.workload", "dwdp.memory")),
    # The cost model's shared vocabulary (per-layer work, hardware profiles): what each
    # strategy's description prices its steps with.
    ("cost primitives", ("dwdp.planner.hardware", "dwdp.planner.model")),
    # Each strategy's description (plan, memory, cost model) and the registry: no torch.distributed.
    ("strategy descriptions", ("dwdp.strategy",)),
    ("runtime", ("dwdp.parallel",)),
    ("applications", ("dwdp.serve", "dwdp.bench", "dwdp.planner")),
    ("cli", ("dwdp.cli",)),
]
# Modules that define strategies: the only ones that may branch on a strategy's name.
STRATEGY_MODULES = ("dwdp/strategy/", "dwdp/parallel/strategies.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The dwdp modules a file imports: module-level, inside functions and under
    ``if TYPE_CHECKING:`` alike (each is a dependency a reader has to follow)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def _layer(module: str) -> int | None:
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (p != "dwdp" and module.startswith(p + "."))) and len(p) > best:
                best, where = len(p), i
    return where


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            if None not in (_layer(a), _layer(b)) and _layer(b) > _layer(a):
                bad.append(f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})")
    return bad


def test_no_import_cycle():
    graph = _graph()
    assert "dwdp.cli" in graph and "dwdp.parallel.rank" in graph["dwdp.parallel.launch"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_and_local_imports_count(tmp_path):
    f = tmp_path / "dwdp" / "x.py"
    f.parent.mkdir()
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                 "def g():\n    from .b import c\n")
    global SRC
    old, SRC = SRC, tmp_path / "dwdp"
    try:
        assert {"dwdp.a", "dwdp.b", "dwdp.b.c"} <= _imports(f)
    finally:
        SRC = old


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if _layer(m) is None)
    assert not unplaced, f"modules outside the declared layers (add them to LAYERS): {unplaced}"


def test_no_upward_import():
    bad = _upward_imports(_graph())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_layer_check_catches_an_upward_import():
    assert _upward_imports({"dwdp.config": {"dwdp.cli"}, "dwdp.cli": {"dwdp.config"}}) == [
        "dwdp.config (base) imports dwdp.cli (cli)"]
    assert _upward_imports({"dwdp.parallel.rank": {"dwdp.strategy.dwdp", "dwdp.models.build"}}) == []


def test_nothing_below_the_cli_imports_it():
    # The CLI's own modules may (its __main__ runs main()).
    importers = sorted(n for n, deps in _graph().items() if "dwdp.cli" in deps and not n.startswith("dwdp.cli."))
    assert importers == [], f"lower layers import the CLI: {importers}"


def _is_strategy_module(path: Path) -> bool:
    rel = "dwdp/" + path.relative_to(SRC).as_posix()
    return any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in STRATEGY_MODULES)


def test_models_know_nothing_of_parallelism():
    for path in (SRC / "models").rglob("*.py"):
        deps = _imports(path)
        text = path.read_text()
        assert "torch.distributed" not in text, path
        assert not any(d.startswith("dwdp.parallel") for d in deps), (path, deps)


def _strategy_names() -> tuple[set[str], set[str]]:
    """(the registry's names, the constants that hold them), read from the registry's source."""
    tree = ast.parse((SRC / "strategy" / "spec.py").read_text())
    names, consts = set(), {"BASELINE"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Tuple):
            for t, v in zip(node.targets[0].elts, node.value.elts):
                if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                    consts.add(t.id)
                    names.add(v.value)
    return names, consts


def _names_a_strategy(node: ast.AST, names: set[str], consts: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, ast.Name):
        return node.id in consts
    if isinstance(node, ast.Attribute):
        return node.attr in consts
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_strategy(e, names, consts) for e in node.elts)
    return False


def _strategy_branches(source: str, names: set[str], consts: set[str]) -> list[int]:
    """Lines comparing a value with a strategy's name (==, !=, is, is not: a literal or one
    of the registry's constants on either side; in, not in: a collection of them on the
    right, or a literal name on the left) or matching one in a ``match`` case. ``BASELINE in results`` looks a name up, it
    does not ask which strategy a value is: not a branch."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    hit = _names_a_strategy(right, names, consts) or (
                        isinstance(left, ast.Constant) and _names_a_strategy(left, names, consts))
                else:
                    hit = _names_a_strategy(left, names, consts) or _names_a_strategy(right, names, consts)
                if hit:
                    lines.append(node.lineno)
                    break
                left = right
        elif isinstance(node, ast.MatchValue) and _names_a_strategy(node.value, names, consts):
            lines.append(node.lineno)
    return lines


def test_the_branch_finder_finds_branches():
    names, consts = {"dp", "dep", "dwdp"}, {"DP", "DEP", "DWDP", "BASELINE"}
    src = ("if s == DEP: pass\nif s.name in (DP, DWDP): pass\nif x != s.DWDP: pass\nif s == 'dep': pass\n"
           "y = pr[DEP]\nfor n in (DEP, DWDP): pass\nif s.lockstep: pass\nif BASELINE in results: pass\n"
           "if 'dwdp' not in s: pass\nmatch s:\n    case 'dp': pass\n")
    assert _strategy_branches(src, names, consts) == [1, 2, 3, 4, 9, 11]


def test_no_branching_on_strategy_names_outside_the_strategy_modules():
    """What differs between strategies is an attribute or method of the strategy (its
    description in dwdp.strategy, its runtime in parallel/strategies.py), not an
    ``if name == DWDP`` elsewhere: adding a strategy then touches its own module only."""
    names, consts = _strategy_names()
    assert names == {"dp", "dep", "dwdp"}, names
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        if _is_strategy_module(path):
            continue
        text = path.read_text()
        hits += [f"{path.relative_to(SRC)}:{i}: {text.splitlines()[i - 1].strip()}"
                 for i in _strategy_branches(text, names, consts)]
    assert not hits, "branching on a strategy name outside the strategy modules:\n" + "\n".join(hits)


def test_importing_the_planner_loads_no_runtime():
    """The planner prices strategies from their descriptions; it runs without a GPU and
    without torch.distributed's process groups, so it must not load dwdp.parallel."""
    code = ("import sys\n"
            "import dwdp.planner.plan, dwdp.planner.model, dwdp.planner.ttft, dwdp.planner.paper, "
            "dwdp.planner.serving, dwdp.planner.hardware, dwdp.planner.calibrate, dwdp.memory, "
            "dwdp.strategy.registry\n"
            "from dwdp.planner.plan import PlanInput, predict_all, memory_per_gpu\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('dwdp.parallel'))))\n")
    src = str(SRC.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the planner loaded: {out.stdout.strip()}"
