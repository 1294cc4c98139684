"""Where every benchmark writes its result: ``<out>/<name>.csv`` and ``<name>.md`` (a header and the table)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_table(out: Path, name: str, header: str, table: pd.DataFrame) -> str:
    """Write ``table`` as CSV and as markdown under ``header``; print and return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False)
    text = header + table.to_markdown(index=False) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return text
