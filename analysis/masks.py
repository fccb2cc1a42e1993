"""Masks in numbers and pictures: how much each run's masks moved and oscillated, what OBF froze, and what an
N:M mask looks like along ``W[Cout, K]``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .readers import RunLike, load_adaptation, load_blocks, load_masks
from .style import new_figure, style

__all__ = ["MASK_STAT_DIGITS", "mask_stats", "block_summary", "mask_image"]

# the digits mask_stats' columns are shown with (tables.mean_std_table)
MASK_STAT_DIGITS = {"top-1 (%)": 2, "mask flips": 0, "oscillation events": 0, "frozen at last adaptation (%)": 2}


def mask_stats(runs: pd.DataFrame, group: str = "group") -> pd.DataFrame:
    """Per run (a row of :func:`analysis.load_runs` with a ``group`` column): its group, top-1 (%), mask flips
    over the run (masks.csv), oscillation events (A -> B -> A returns, adaptation.csv) and the share of blocks
    frozen at the last adaptation step (NaN for a run without adaptation.csv)."""
    rows = []
    for _, run in runs.iterrows():
        masks, adapt = load_masks(run), load_adaptation(run)
        last = adapt[adapt["step"] == adapt["step"].max()] if len(adapt) else adapt
        rows.append({
            "group": run[group],
            "top-1 (%)": run["top1"],
            "mask flips": float(masks["flips"].sum()),
            "oscillation events": float(adapt["oscillation_events"].sum()) if len(adapt) else np.nan,
            "frozen at last adaptation (%)": 100 * last["frozen_blocks"].sum() / last["num_blocks"].sum()
            if len(last) else np.nan,
        })
    return pd.DataFrame(rows, columns=["group", *MASK_STAT_DIGITS])


def block_summary(run: RunLike) -> tuple[int, pd.DataFrame] | None:
    """The last block snapshot of a BAME run, per layer: its blocks, how many ever changed, their mean number
    of changes and oscillation frequency, and the share frozen; with the snapshot's step. None without one."""
    blocks = load_blocks(run)
    if blocks.empty:
        return None
    step = int(blocks["step"].max())
    final = blocks[blocks["step"] == step]
    per_layer = final.groupby("layer").agg(
        blocks=("block", "size"), changed=("changes", lambda c: int((c > 0).sum())),
        mean_changes=("changes", "mean"), mean_frequency=("frequency", "mean"), frozen=("frozen", "mean"))
    return step, per_layer


def mask_image(masks: Mapping[str, tuple[np.ndarray, int]], layer: str, rows: int = 16, cols: int = 64) -> Figure:
    """One layer's mask under several patterns, each panel the first ``rows`` rows x ``cols`` entries of
    ``W[Cout, K]`` (black: kept), a red line between groups of M. ``masks``: ``{pattern: (mask as
    [Cout, K] booleans, M)}``."""
    with style():
        fig, axes = new_figure(3.4 * len(masks), 2.8, ncols=len(masks), squeeze=False)
        for ax, (pattern, (mask, m)) in zip(axes[0], masks.items()):
            ax.imshow(np.asarray(mask, dtype=float)[:rows, :cols], cmap="Greys", vmin=0, vmax=1,
                      interpolation="nearest", aspect="auto")
            for x in range(m, cols, m):
                ax.axvline(x - 0.5, color="tab:red", lw=0.6)
            ax.grid(False)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{layer}, {pattern}", loc="left")
            ax.set_xlabel("k along W[Cout, K]")
            ax.set_ylabel("output channel")
    return fig
