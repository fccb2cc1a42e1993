"""Final top-1 against total training FLOPs: one marker per group, error bars over seeds, the Pareto front.

The input is a tidy table of per-run rows (:func:`analysis.groups.run_points`, or one built by hand):
``group``, ``method``, ``pattern``, ``top1`` (%), ``train_flops`` (ideal, 2 x MACs) and optionally
``family`` (groups of one family are joined by a line, e.g. one reading at several switch fractions).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .groups import _method_rank, _pattern_rank
from .style import empty, flops_axis, legend_beside, marker_size, method_color, new_figure, pattern_marker, style

__all__ = ["group_means", "pareto_front", "pareto_scatter"]

REQUIRED = ("group", "method", "pattern", "top1", "train_flops")
LOG_RATIO = 20.0  # a FLOPs axis spanning more than this factor is drawn in log scale


def group_means(points: pd.DataFrame) -> pd.DataFrame:
    """Per group: method, pattern, family, ``n`` (runs), ``top1_mean`` / ``top1_std`` and ``flops_mean`` /
    ``flops_std`` (sample std over the runs; NaN for one run), in table order (method, pattern)."""
    missing = [c for c in REQUIRED if c not in points]
    if missing:
        raise ValueError(f"the per-run table lacks column(s) {missing}: it needs {list(REQUIRED)} "
                         f"(see analysis.run_points)")
    rows = []
    for group, g in points.groupby("group", sort=False):
        family = g["family"].dropna() if "family" in g else pd.Series([], dtype=object)
        top1, flops = g["top1"].astype(float), g["train_flops"].astype(float)
        rows.append({"group": group, "method": str(g["method"].iloc[0]), "pattern": str(g["pattern"].iloc[0]),
                     "family": family.iloc[0] if len(family) else None, "n": len(g),
                     "top1_mean": top1.mean(), "top1_std": top1.std(ddof=1) if len(g) > 1 else math.nan,
                     "flops_mean": flops.mean(), "flops_std": flops.std(ddof=1) if len(g) > 1 else math.nan})
    table = pd.DataFrame(rows, columns=["group", "method", "pattern", "family", "n", "top1_mean", "top1_std",
                                        "flops_mean", "flops_std"])
    order = sorted(table.index, key=lambda i: (_method_rank(table.at[i, "method"]),
                                               _pattern_rank(table.at[i, "pattern"]), table.at[i, "group"]))
    return table.loc[order].reset_index(drop=True)


def pareto_front(table: pd.DataFrame, x: str = "flops_mean", y: str = "top1_mean") -> pd.DataFrame:
    """The rows no other row dominates (another row with at most as many FLOPs and a higher top-1, or
    fewer FLOPs and as high a top-1), sorted by ``x``."""
    valid = table.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False], kind="stable")
    keep, best = [], -np.inf
    for idx, row in valid.iterrows():
        if row[y] > best:
            keep.append(idx)
            best = row[y]
    return valid.loc[keep]


def _header(text: str) -> tuple[Line2D, str]:
    """A legend row that is a heading (no symbol)."""
    return Line2D([], [], linestyle="none"), text


GROUP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "8")


def _group_markers(table: pd.DataFrame) -> dict[str, str]:
    """A marker per group, told apart within each method (the colour tells the methods apart)."""
    seen: dict[str, int] = {}
    out = {}
    for _, g in table.iterrows():
        k = seen.get(g["method"], 0)
        seen[g["method"]] = k + 1
        out[g["group"]] = GROUP_MARKERS[k % len(GROUP_MARKERS)]
    return out


def pareto_scatter(points: pd.DataFrame, title: str = "Final top-1 against training FLOPs",
                   logx: bool | None = None, legend: str = "methods") -> Figure:
    """One marker per group at its mean training FLOPs and mean final top-1, error bars ±1 std over seeds.

    Colour per method; marker per pattern (``legend='methods'``: the legend lists methods and patterns)
    or per group within its method (``legend='groups'``: the legend names every group, for a study of
    many readings at one pattern). The Pareto front of the group means is a dashed staircase (gid
    ``pareto-front``); groups of one ``family`` are joined by a dotted line (gid ``family:<name>``). Each
    group's data line has gid ``group:<label>``. ``logx`` defaults to a log axis when the FLOPs span more
    than a factor of 20.
    """
    if legend not in ("methods", "groups"):
        raise ValueError(f"pareto_scatter: legend must be 'methods' or 'groups', got {legend!r}")
    table = group_means(points)
    markers = _group_markers(table)
    with style():
        fig, ax = new_figure(7.2, 4.4)
        if table.empty:
            empty(ax, "no completed runs")
            return fig
        for _, g in table.iterrows():
            marker = pattern_marker(g["pattern"]) if legend == "methods" else markers[g["group"]]
            bars = ax.errorbar(g["flops_mean"], g["top1_mean"], xerr=_nan0(g["flops_std"]),
                               yerr=_nan0(g["top1_std"]), fmt=marker, color=method_color(g["method"]),
                               ms=marker_size(marker, 7), mec="white", mew=0.6, capsize=2, elinewidth=0.9,
                               zorder=3)
            bars.lines[0].set_gid(f"group:{g['group']}")
        handles, labels = [], []
        for family, f in table.dropna(subset=["family"]).groupby("family", sort=False):
            if len(f) < 2:
                continue
            f = f.sort_values("flops_mean")
            (line,) = ax.plot(f["flops_mean"], f["top1_mean"], ls=":", lw=1.2, zorder=2,
                              color=method_color(f["method"].iloc[0]))
            line.set_gid(f"family:{family}")
            handles.append(line)
            labels.append(str(family))
        front = pareto_front(table)
        (front_line,) = ax.plot(front["flops_mean"], front["top1_mean"], drawstyle="steps-post", ls="--",
                                lw=1.0, color="0.35", zorder=1)
        front_line.set_gid("pareto-front")
        spread = table["flops_mean"].max() / max(table["flops_mean"].min(), 1e-300)
        if logx if logx is not None else spread > LOG_RATIO:
            ax.set_xscale("log")
        flops_axis(ax.xaxis, "training FLOPs (ideal, whole run)")
        ax.set_ylabel("final test top-1 (%)")
        ax.set_title(f"{title}\nmean ± std over seeds")
        if legend == "methods":
            _legend(fig, table, front_line, handles, labels)
        else:
            _group_legend(fig, table, markers, front_line, handles, labels)
    return fig


def _nan0(v: float) -> float:
    return 0.0 if v is None or math.isnan(v) else float(v)


def _legend(fig: Figure, table: pd.DataFrame, front: Line2D, families: list, family_labels: list[str]) -> None:
    rows = [_header("method")]
    for method in sorted(table["method"].unique(), key=_method_rank):
        rows.append((Line2D([], [], ls="none", marker="o", color=method_color(method), ms=6), method))
    rows.append(_header("pattern"))
    for pattern in sorted(table["pattern"].unique(), key=_pattern_rank):
        marker = pattern_marker(pattern)
        rows.append((Line2D([], [], ls="none", marker=marker, color="0.4", ms=marker_size(marker, 6)), pattern))
    rows.append((front, "Pareto front"))
    if families:
        rows.append(_header("family"))
        rows += list(zip(families, family_labels))
    handles, labels = zip(*rows)
    legend_beside(fig, list(handles), list(labels))


def _group_legend(fig: Figure, table: pd.DataFrame, markers: dict[str, str], front: Line2D, families: list,
                  family_labels: list[str]) -> None:
    rows = [_header("group")]
    for _, g in table.iterrows():
        marker = markers[g["group"]]
        rows.append((Line2D([], [], ls="none", marker=marker, color=method_color(g["method"]),
                            ms=marker_size(marker, 6)), str(g["group"])))
    rows.append((front, "Pareto front"))
    if families:
        rows.append(_header("family"))
        rows += list(zip(families, family_labels))
    handles, labels = zip(*rows)
    legend_beside(fig, list(handles), list(labels))
