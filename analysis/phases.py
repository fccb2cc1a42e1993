"""Training FLOPs per phase (forward, input gradient, weight gradient, mask adaptation), from flops.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bame.contract import ADAPTATION, FORWARD, INPUT_GRAD, PHASES, WEIGHT_GRAD

from .figures import RunsLike, _group_order, _runs
from .groups import group_labels
from .readers import RunLike, load_flops
from .style import empty, flops_axis, new_figure, style

__all__ = ["PHASE_LABELS", "phase_breakdown", "phase_totals"]

PHASE_LABELS = {FORWARD: "forward", INPUT_GRAD: "input gradient", WEIGHT_GRAD: "weight gradient",
                ADAPTATION: "mask adaptation"}
_PHASE_COLORS = {FORWARD: "#0072B2", INPUT_GRAD: "#56B4E9", WEIGHT_GRAD: "#D55E00", ADAPTATION: "#CC79A7"}


def phase_totals(run: RunLike, view: str = "ideal") -> pd.Series:
    """Training FLOPs (2 x MACs) of one run per phase, from flops.csv (every epoch and layer)."""
    f = load_flops(run)
    col = f"{view}_macs"
    if f.empty:
        return pd.Series({p: 0.0 for p in PHASES}, dtype=float)
    totals = 2.0 * f.groupby("phase")[col].sum().astype(float)
    phases = list(PHASES) + [p for p in totals.index if p not in PHASES]
    return totals.reindex(phases, fill_value=0.0)


def phase_breakdown(runs: RunsLike, view: str = "ideal", completed_only: bool = True) -> Figure:
    """Stacked horizontal bars: training FLOPs per phase (forward, input gradient, weight gradient,
    adaptation).

    One bar per group (top to bottom in table order), the mean over its seeds of each phase's total
    from flops.csv; ``view`` is ``ideal`` or ``executed``. Each bar segment's gid is ``<group>|<phase>``.
    """
    if view not in ("ideal", "executed"):
        raise ValueError(f"view must be 'ideal' or 'executed', got {view!r}")
    df = _runs(runs, completed_only)
    labels = group_labels(df)
    groups = [g[0] for g in _group_order(df, labels)] if not df.empty else []
    totals: dict[str, list[pd.Series]] = {g: [] for g in groups}
    for idx, run in df.iterrows():
        t = phase_totals(run, view)
        if t.sum() > 0:
            totals[labels[idx]].append(t)
    groups = [g for g in groups if totals[g]]
    with style():
        fig, ax = new_figure(7.2, 0.32 * len(groups) + 1.8)
        if not groups:
            empty(ax, "no runs" if df.empty else "no flops.csv in these runs")
            return fig
        means = pd.DataFrame({g: pd.concat(totals[g], axis=1).mean(axis=1) for g in groups}).fillna(0.0)
        y = np.arange(len(groups))
        left = np.zeros(len(groups))
        for phase in means.index:
            values = means.loc[phase].to_numpy(float)
            if not values.any():
                continue
            bars = ax.barh(y, values, left=left, color=_PHASE_COLORS.get(phase), height=0.65,
                           label=PHASE_LABELS.get(phase, phase))
            for g, patch in zip(groups, bars.patches):
                patch.set_gid(f"{g}|{phase}")
            left += values
        ax.set_yticks(y)
        ax.set_yticklabels(groups)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        flops_axis(ax.xaxis, f"training FLOPs ({view}), mean over seeds")
        ax.set_title(f"Training FLOPs per phase ({view})")
        fig.legend(loc="outside lower center", ncols=4)
    return fig
