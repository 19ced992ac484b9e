"""Markdown tables: the one helper every table of the project is printed with, and the one way a
figure is shown with its 95 % interval."""
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


def with_interval(metrics: Mapping[str, Any], key: str) -> str:
    """``metrics[key]`` as "0.781 [0.740, 0.822]" with its interval from ``metrics["ci95"]``, or
    alone ("0.923") when it has none."""
    if key not in metrics.get("ci95", {}):
        return f"{metrics[key]:.3f}"
    low, high = metrics["ci95"][key]
    return f"{metrics[key]:.3f} [{low:.3f}, {high:.3f}]"
