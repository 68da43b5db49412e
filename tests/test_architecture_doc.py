"""docs/ARCHITECTURE.md names only modules and functions that exist, so it cannot drift
from the tree unnoticed when modules move."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "dwdp"


def _named(text: str) -> list[tuple[str, str | None]]:
    """(path, symbol or None) for every `path.py`, `path.py:name` and `dir/` in backticks."""
    out = []
    for tok in re.findall(r"`([^`\s]+)`", text):
        m = re.fullmatch(r"([\w./]+\.py)(?::(\w+))?", tok)
        if m:
            out.append((m.group(1), m.group(2)))
        elif re.fullmatch(r"[\w]+(/[\w]+)*/", tok):
            out.append((tok, None))
    return out


def _resolve(path: str) -> Path | None:
    for base in (SRC, ROOT):
        if (base / path).exists():
            return base / path
    return None


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.name == name
               for n in ast.walk(tree))


def test_every_named_module_and_function_exists():
    named = _named((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    assert len(named) > 30  # the page walks through the modules by name
    missing = [p for p, _ in named if _resolve(p) is None]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"
    gone = [f"{p}:{s}" for p, s in named if s and not _defines(_resolve(p), s)]
    assert not gone, f"docs/ARCHITECTURE.md names functions or classes that do not exist: {gone}"

