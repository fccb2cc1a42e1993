"""Published numbers to compare against, from ``analysis/published.csv``.

Only figures stated verbatim in a cited source are listed (the ``source`` column names it); nothing is
estimated or read off a plot. Columns: dataset, model, pattern, method, top1, metric, source, note.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["PUBLISHED_CSV", "load_published"]

PUBLISHED_CSV = Path(__file__).with_name("published.csv")


def load_published(path: str | Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The published numbers as a DataFrame (patterns kept as strings such as ``'1:16'``)."""
    df = pd.read_csv(path, dtype={"pattern": str, "dataset": str, "model": str, "method": str})
    missing = [c for c in ("dataset", "model", "pattern", "method", "top1", "source") if c not in df]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    if df["source"].isna().any():
        raise ValueError(f"{path}: every published number needs a source")
    return df
