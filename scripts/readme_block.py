"""Rewrite one generated block of the README between two marker comments, or check it.

Shared by the scripts that generate README tables from code (settings_table.py,
metrics_table.py): `python scripts/X.py` rewrites the block, `--check` exits 1 when stale.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def rewritten(text: str, start: str, end: str, table: str) -> str:
    """`text` with the block between the markers replaced by `table`."""
    head, found_start, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found_start or not found_end:
        raise SystemExit(f"{README}: the markers {start!r} and {end!r} are missing")
    return f"{head}{start}\n{table}\n{end}{tail}"


def main(what: str, start: str, end: str, table: Callable[[], str]) -> int:
    text = README.read_text()
    new = rewritten(text, start, end, table())
    if "--check" in sys.argv[1:]:
        if new != text:
            script = Path(sys.argv[0]).name
            print(f"README.md's {what} is stale: run python scripts/{script}")
            return 1
        return 0
    README.write_text(new)
    return 0
