"""Functions short enough to read (issue 20): none over 80 lines, counted from the ``def`` line to the last line
of its body (decorators aside), nested functions and methods included.

Checked for ``ex2l_xai`` today; ``analysis`` and ``figures`` join :data:`PACKAGES` once their long functions
are split."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
PACKAGES = ["ex2l_xai", "analysis", "figures"]


def long_functions(path: Path, root: Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """``"file:line name (n lines)"`` (file relative to ``root``) for every function or method of ``path`` longer
    than ``limit`` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > limit:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_80_lines(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    too_long = [f for path in files for f in long_functions(path)]
    assert too_long == [], "split these functions: " + "; ".join(too_long)


def test_the_count_runs_from_def_to_the_last_line_of_the_body(tmp_path: Path) -> None:
    def body(indent: int, n: int) -> str:
        return "\n".join(" " * indent + f"x{i} = {i}" for i in range(n))

    (tmp_path / "m.py").write_text(
        f"@staticmethod\ndef ok():\n{body(4, 79)}\n\n\n"  # 80 lines with its def: allowed
        f"class C:\n    def long(self):\n{body(8, 80)}\n\n"  # 81 lines
        f"    def outer(self):\n        def inner():\n{body(12, 81)}\n        return inner\n"
    )
    assert long_functions(tmp_path / "m.py", tmp_path) == [
        "m.py:85 long (81 lines)", "m.py:167 outer (84 lines)", "m.py:168 inner (82 lines)"]
