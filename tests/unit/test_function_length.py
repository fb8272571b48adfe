"""Every function in src/ is under 60 lines (decorators and docstring included): issue 17."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LIMIT = 59  # at most: "under 60 lines"


def function_lengths() -> dict[tuple[str, str], int]:
    """Each function's length in lines, by (file under src/, name); the longest of a name."""
    lengths: dict[tuple[str, str], int] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                where = (path.relative_to(SRC).as_posix(), node.name)
                length = (node.end_lineno or node.lineno) - start + 1
                lengths[where] = max(length, lengths.get(where, 0))
    return lengths


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = {where: length for where, length in function_lengths().items() if length > LIMIT}
    assert too_long == {}, f"split these functions (at most {LIMIT} lines): {too_long}"
