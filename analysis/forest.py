"""A forest plot of readings: each group's change in top-1 against the control, mean ± std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .readings import reading_text
from .tables import pm
from .style import empty, method_color, new_figure, style

__all__ = ["forest_plot"]

ROW_HEIGHT_IN = 0.26  # per reading: the figure grows with the table, the labels never crowd


def forest_plot(readings: pd.DataFrame, reference_label: str = "(the reference reading)",
                title: str | None = None) -> Figure:
    """Change in mean top-1 against the control, one row per group, best at the top.

    Input: :func:`analysis.readings_table`. One panel per experiment and pattern (sharing the x axis);
    each group is a point at ``delta`` with a ±1 std bar (its own spread over seeds), coloured by
    method (gid ``reading:<group>``); the control is the line at 0 and its ±1 std is shaded (gid
    ``control-band``). Labels read ``method: settings`` (:func:`analysis.readings.reading_text`).
    """
    control = readings.attrs.get("control", "static")
    cells = [(key, g) for key, g in readings.groupby(["experiment", "pattern"], sort=False)
             if (~g["is_control"]).any()]
    several = readings["experiment"].nunique() > 1
    with style():
        if not cells:
            fig, ax = new_figure(6.4, 2.5)
            empty(ax, f"no groups to compare with a {control} control")
            return fig
        heights = [ROW_HEIGHT_IN * int((~g["is_control"]).sum()) + 0.45 for _, g in cells]
        fig, axes = new_figure(7.2, sum(heights) + 1.3, nrows=len(cells), sharex=True, squeeze=False,
                               gridspec_kw={"height_ratios": heights})
        for ax, ((experiment, pattern), g) in zip(axes[:, 0], cells):
            ref = g[g["is_control"]].iloc[0]
            rows = g[~g["is_control"]].sort_values("delta", ascending=False, kind="stable")
            y = np.arange(len(rows))
            if not math.isnan(ref["control_std"]):
                band = ax.axvspan(-ref["control_std"], ref["control_std"], color="0.5", alpha=0.18, lw=0)
                band.set_gid("control-band")
            ax.axvline(0.0, color="0.3", lw=0.9)
            for yi, (_, r) in zip(y, rows.iterrows()):
                std = 0.0 if math.isnan(r["top1_std"]) else r["top1_std"]
                bars = ax.errorbar(r["delta"], yi, xerr=std, fmt="o", ms=5, capsize=2, elinewidth=1.0,
                                   color=method_color(r["method"]))
                bars.lines[0].set_gid(f"reading:{r['group']}")
            ax.set_yticks(y)
            ax.set_yticklabels([f"{r['method']}: {reading_text(r, reference_label)}" for _, r in rows.iterrows()])
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.grid(axis="y", visible=False)
            where = f"{pattern}, {experiment}" if several else pattern
            ax.set_title(f"{where}: {control} {pm(ref['control_mean'], ref['control_std'])} (n={int(ref['n_seeds'])})", loc="left", fontsize=9)
        axes[-1, 0].set_xlabel(f"change in top-1 against {control} (points)")
        handles = [Line2D([], [], ls="none", marker="o", color="0.3"), Patch(color="0.5", alpha=0.18, lw=0)]
        fig.legend(handles, ["group: mean ± std over seeds", f"{control}: ±1 std"], loc="outside lower center",
                   ncols=2)
        if title:
            fig.suptitle(title)
    return fig
