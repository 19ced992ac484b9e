"""Markdown tables: the one helper every table of the project is printed with."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """Rows of equal keys as a Markdown table; floats with ``digits`` decimals, None as n/a."""
    if not rows:
        raise ValueError("no rows to show")
    keys = list(rows[0])
    if any(list(row) != keys for row in rows):
        raise ValueError(f"every row needs the keys {keys}")

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
