"""Result tables the trainers print at the end of a run and the READMEs show."""

from __future__ import annotations

from collections.abc import Sequence


def cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats with 4 decimals."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
