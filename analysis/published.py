"""Published numbers to compare against, from ``analysis/published.csv``.

Only figures stated verbatim in a cited source are listed (the ``source`` column names it); nothing is
estimated or read off a plot. Columns: dataset, model, pattern, method, top1, metric, source, note.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bame.pattern import NMPattern

__all__ = ["PUBLISHED_CSV", "load_published", "published_comparison"]

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


def published_comparison(table: pd.DataFrame, published: pd.DataFrame, ours: str = "ours",
                         reference: tuple[str, str, str] = ("imagenet", "resnet50", "1:16")) -> pd.DataFrame:
    """BAME against SR-STE as published (``reference``: data set, model, pattern) beside the same comparison at
    our sparsest pattern in ``table`` (:func:`analysis.paper_table`): top-1 of each, their gap, and the
    training-FLOPs ratios (a published ratio only where its note states one). A different data set, model,
    schedule and scale: compare the sign and size of the gap and the FLOPs ratio, never the accuracies."""
    data_set, model, pattern = reference
    sparse = table[table["method"].isin(["bame", "srste"])]
    at = min(sparse["pattern"], key=lambda p: NMPattern.parse(p).density)  # our sparsest pattern
    mine = {m: sparse[(sparse["method"] == m) & (sparse["pattern"] == at)].iloc[0] for m in ("bame", "srste")}
    theirs = {m: published[(published["method"] == m) & (published["model"] == model)
                           & (published["pattern"] == pattern)].iloc[0] for m in ("bame", "srste")}
    stated = re.search(r"([0-9.]+)x fewer training FLOPs", str(theirs["bame"].get("note", "")))

    def acc(row: pd.Series) -> str:
        return f"{row.top1_mean:.2f} ± {row.top1_std:.2f}" if row.n_seeds > 1 else f"{row.top1_mean:.2f}"

    return pd.DataFrame({
        f"published: {data_set} / {model} / {pattern}": {
            "BAME top-1 (%)": f"{theirs['bame'].top1:.1f}",
            "SR-STE top-1 (%)": f"{theirs['srste'].top1:.1f}",
            "BAME - SR-STE (points)": f"{theirs['bame'].top1 - theirs['srste'].top1:+.1f}",
            "training FLOPs, SR-STE / BAME": f"{stated.group(1)}x (as stated)" if stated else "–",
            "training FLOPs, dense / BAME": "–",
            "source": theirs["bame"].source,
        },
        f"{ours}: {mine['bame']['data.name']} / {mine['bame']['model.name']} / {at}": {
            "BAME top-1 (%)": acc(mine["bame"]),
            "SR-STE top-1 (%)": acc(mine["srste"]),
            "BAME - SR-STE (points)": f"{mine['bame'].top1_mean - mine['srste'].top1_mean:+.2f}",
            "training FLOPs, SR-STE / BAME": f"{mine['srste'].train_flops / mine['bame'].train_flops:.2f}x",
            "training FLOPs, dense / BAME": f"{1 / mine['bame'].flops_x_dense:.2f}x",
            "source": f"{int(mine['bame'].n_seeds)} seed(s), exact ledger counts",
        },
    }).rename_axis("")
