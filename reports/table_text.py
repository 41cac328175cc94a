"""Tables as text: the cells of the report's tables, and Markdown tables (trackers get them too; no matplotlib)."""

from __future__ import annotations

import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    cells = frame.reset_index().map(cell_text)
    header = "| " + " | ".join(str(c) for c in cells.columns) + " |"
    numeric = [pd.api.types.is_numeric_dtype(frame.reset_index()[c]) for c in cells.columns]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def cell_text(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
