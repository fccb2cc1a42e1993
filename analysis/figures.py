"""Curves from run folders: each function returns a matplotlib Figure; :func:`analysis.save` writes PNG + PDF.

Conventions shared by these figures:
- a *group* is a set of seeds of one experiment (:mod:`analysis.groups`); its label reads ``bame 2:4``
  (dense: ``dense``), or is the runs' own ``group`` column when they carry one; its colour is its method's,
  its marker its pattern's (:mod:`analysis.style`);
- thin lines are single runs (``Line2D.get_gid()`` is the run id), thick lines are group means
  (gid ``mean:<label>``) with a ±1 std band over seeds;
- FLOPs on an axis are training FLOPs = 2 x MACs, ideal view, in SI units.

Comparisons of final numbers are in :mod:`analysis.pareto` (accuracy against FLOPs, one marker per
group) and :mod:`analysis.forest` (readings against the control); FLOPs per phase in :mod:`analysis.phases`. Figures never import the training
code and never call ``plt.show``; pick a backend (``Agg`` in tests and scripts) before importing pyplot
elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from bame.contract import DENSE_PATTERN

from .groups import _method_rank, _pattern_rank, group_labels, pattern_labels
from .readers import accuracy_percent, load_adaptation, load_masks, load_metrics, load_runs, load_sparsify
from .style import empty, flops_axis, group_styles, legend_beside, legend_inside_or_below, new_figure, style

__all__ = ["accuracy_vs_flops", "frozen_fraction", "layer_flips", "learning_curves", "mask_flips", "training_loss"]

RunsLike = Union[str, Path, pd.DataFrame]
Curve = Callable[[pd.Series], pd.DataFrame]


# --------------------------------------------------------------------------------------------------
# shared helpers


def _runs(runs: RunsLike, completed_only: bool) -> pd.DataFrame:
    df = load_runs(runs) if isinstance(runs, (str, Path)) else runs
    if completed_only and "status" in df:
        df = df[df["status"] == "completed"]
    return df


def _group_order(runs: pd.DataFrame, labels: pd.Series) -> list[tuple[str, str, str]]:
    """(label, method, pattern) of each group, in table order (method, then density of the pattern)."""
    first = {}
    patterns = pattern_labels(runs)
    for idx, lab in labels.items():
        if lab not in first:
            first[lab] = (str(runs.loc[idx, "method.name"]), patterns[idx])
    return sorted(((lab, *mp) for lab, mp in first.items()),
                  key=lambda g: (_method_rank(g[1]), _pattern_rank(g[2]), g[0]))


def _mean_band(ax: Axes, curves: list[pd.DataFrame], x: str, y: str, label: str, align: str,
               **line: Any) -> None:
    """Plot the mean curve of several runs and a ±1 std band.

    ``align='index'``: runs are aligned point by point (the k-th evaluation of each run; their x
    values are averaged too); ``align='x'``: aligned on equal x values (steps).
    """
    if not curves:
        return
    if align == "index":
        n = min(len(c) for c in curves)
        xs = np.stack([c[x].to_numpy(float)[:n] for c in curves])
        ys = np.stack([c[y].to_numpy(float)[:n] for c in curves])
        xm = xs.mean(axis=0)
        ym = ys.mean(axis=0)
        ys_std = ys.std(axis=0, ddof=1) if len(curves) > 1 else None
    else:
        table = pd.concat([c.set_index(x)[y].rename(i) for i, c in enumerate(curves)], axis=1)
        table = table.sort_index()
        xm = table.index.to_numpy(float)
        ym = table.mean(axis=1).to_numpy(float)
        ys_std = table.std(axis=1, ddof=1).to_numpy(float) if len(curves) > 1 else None
    (mean,) = ax.plot(xm, ym, lw=1.8, label=f"{label} (n={len(curves)})", **line)
    mean.set_gid(f"mean:{label}")
    if ys_std is not None:
        band = ax.fill_between(xm, ym - ys_std, ym + ys_std, color=line.get("color"), alpha=0.18, lw=0)
        band.set_gid(f"band:{label}")


def _plot_runs_with_means(ax: Axes, df: pd.DataFrame, curve_fn: Curve, xcol: str, ycol: str, align: str,
                          thin: bool = True) -> None:
    """Per group, a mean line with a ±1 std band and (``thin``) one thin line per run (gid = run id)."""
    labels = group_labels(df)
    groups = _group_order(df, labels)
    styles = group_styles(groups)
    per_group: dict[str, list[pd.DataFrame]] = {g[0]: [] for g in groups}
    for idx, run in df.iterrows():
        curve = curve_fn(run)
        if curve.empty:
            continue
        g = labels[idx]
        per_group[g].append(curve)
        if thin:
            (line,) = ax.plot(curve[xcol], curve[ycol], color=styles[g]["color"], lw=0.7, alpha=0.4,
                              ls=styles[g]["linestyle"])
            line.set_gid(str(run["run_id"]))
    for g, _, _ in groups:
        s = styles[g]
        # markers (the pattern's) tell apart groups of one method; spaced out on long curves
        _mean_band(ax, per_group[g], xcol, ycol, g, align, color=s["color"], ls=s["linestyle"],
                   marker=s["marker"], ms=4, markevery=0.08)


def _step_axes(ax: Axes, ylabel: str, title: str) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


# --------------------------------------------------------------------------------------------------
# accuracy vs training FLOPs, training loss


def _eval_curve(run: pd.Series, split: str) -> pd.DataFrame:
    m = load_metrics(run)
    if m.empty or "split" not in m:
        return pd.DataFrame(columns=["flops", "top1"])
    m = m[m["split"].astype(str) == split]
    m = m.dropna(subset=["cum_ideal_macs", "acc"])
    return pd.DataFrame({"flops": 2.0 * m["cum_ideal_macs"].to_numpy(float),
                         "top1": [accuracy_percent(a) for a in m["acc"]],
                         "step": m["step"].to_numpy()})


def accuracy_vs_flops(runs: RunsLike, split: str = "test", completed_only: bool = True,
                      logx: bool = False) -> Figure:
    """Top-1 (%) at each evaluation against cumulative training FLOPs (ideal, 2 x MACs).

    One thin line per run (gid = run id; its last point is the run's final accuracy and total
    FLOPs), a thick mean line per group with a ±1 std band (runs aligned by evaluation index). For
    more than a few groups, :func:`analysis.pareto_scatter` (final numbers only) reads better.
    """
    df = _runs(runs, completed_only)
    with style():
        fig, ax = new_figure(6.4, 5.0)
        if df.empty:
            empty(ax, "no runs")
            return fig
        _plot_runs_with_means(ax, df, lambda run: _eval_curve(run, split), "flops", "top1", "index")
        if not ax.lines:
            empty(ax, f"no '{split}' evaluations in metrics.csv")
            return fig
        if logx:
            ax.set_xscale("log")
        flops_axis(ax.xaxis, "cumulative training FLOPs (ideal)")
        ax.set_ylabel(f"{split} top-1 (%)")
        ax.set_title("Accuracy against training FLOPs")
        legend_inside_or_below(ax)
    return fig


def learning_curves(metrics: pd.DataFrame, title: str = "") -> Figure:
    """One run's top-1 (%) and loss over training steps, train rows as lines and test rows as points
    (``metrics``: :func:`analysis.load_metrics`)."""
    with style():
        fig, axes = new_figure(7.2, 3.0, ncols=2, squeeze=False)
        acc_ax, loss_ax = axes[0]
        for split, fmt in (("train", "-"), ("test", "o-")):
            part = metrics[metrics["split"] == split]
            acc_ax.plot(part["step"], 100 * part["acc"], fmt, label=split)
            loss_ax.plot(part["step"], part["loss"], fmt, label=split)
        _step_axes(acc_ax, "top-1 (%)", f"{title}: accuracy" if title else "accuracy")
        _step_axes(loss_ax, "cross-entropy", "loss")
        for ax in (acc_ax, loss_ax):
            ax.legend(loc="best")
    return fig


def _train_loss(run: pd.Series) -> pd.DataFrame:
    m = load_metrics(run)
    if m.empty or "split" not in m:
        return pd.DataFrame(columns=["step", "loss"])
    m = m[m["split"].astype(str) == "train"].dropna(subset=["loss"])
    return pd.DataFrame({"step": m["step"].to_numpy(), "loss": m["loss"].to_numpy(float)})


def training_loss(runs: RunsLike, completed_only: bool = True) -> Figure:
    """Training loss (mean over each logging interval) over steps: one panel per N:M pattern.

    Per group, the mean over seeds with a ±1 std band (gid ``mean:<label>``); dense runs are drawn in
    every panel as the reference. The loss answers whether a method trains as fast as dense, and when
    a mask change (e.g. BAME's adaptation window) costs progress.
    """
    df = _runs(runs, completed_only)
    shown = pattern_labels(df) if "method.pattern" in df else pd.Series([], dtype=object)
    patterns = sorted(set(shown[shown != DENSE_PATTERN]), key=_pattern_rank) or [DENSE_PATTERN]
    with style():
        fig, axes = new_figure(7.2, 2.4 * len(patterns) + 0.6, nrows=len(patterns), sharex=True,
                               squeeze=False)
        if df.empty:
            empty(axes[0, 0], "no runs")
            return fig
        dense = df["method.name"] == "dense"
        for ax, pattern in zip(axes[:, 0], patterns):
            sub = df[dense | (shown == pattern)]
            _plot_runs_with_means(ax, sub, _train_loss, "step", "loss", "x", thin=False)
            if not ax.lines:
                empty(ax, "no training loss in metrics.csv")
                continue
            ax.set_ylabel("training loss")
            ax.set_title(f"{pattern}" if pattern != DENSE_PATTERN else "dense", loc="left")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        axes[-1, 0].set_xlabel("training step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle("Training loss (mean over seeds, band ±1 std)")
    return fig


# --------------------------------------------------------------------------------------------------
# frozen blocks, mask flips


def _frozen_curve(run: pd.Series) -> pd.DataFrame:
    a = load_adaptation(run)
    if a.empty:
        return pd.DataFrame(columns=["step", "frozen_fraction"])
    g = a.groupby("step")[["frozen_blocks", "num_blocks"]].sum()
    return pd.DataFrame({"step": g.index.to_numpy(),
                         "frozen_fraction": (g["frozen_blocks"] / g["num_blocks"]).to_numpy(float)})


def _per_step_plot(df: pd.DataFrame, curve_fn: Curve, ycol: str, ylabel: str, title: str,
                   empty_text: str, logy: bool = False, ylim_fraction: bool = False,
                   nonnegative: bool = False) -> Figure:
    with style():
        fig, ax = new_figure(6.4, 4.0)
        if df.empty:
            empty(ax, "no runs")
            return fig
        _plot_runs_with_means(ax, df, curve_fn, "step", ycol, "x")
        if not ax.lines:
            empty(ax, empty_text)
            return fig
        if logy:
            ax.set_yscale("log")  # steps without flips (zeros) are left out of a log axis
        elif nonnegative:
            ax.set_ylim(bottom=0.0)  # counts: no negative ticks, even where a ±1 std band dips below 0
        if ylim_fraction:
            top = max((float(np.nanmax(line.get_ydata())) for line in ax.lines if len(line.get_ydata())),
                      default=0.0)
            ax.set_ylim(0.0, max(0.01, 1.1 * top))
        _step_axes(ax, ylabel, title)
        legend_inside_or_below(ax)
    return fig


def frozen_fraction(runs: RunsLike, completed_only: bool = True) -> Figure:
    """Fraction of all blocks (every N:M layer together) frozen by OBF, at each adaptation step.

    From adaptation.csv: sum of ``frozen_blocks`` over sum of ``num_blocks``. Runs without
    adaptation.csv (every method but BAME) are left out.
    """
    return _per_step_plot(_runs(runs, completed_only), _frozen_curve, "frozen_fraction",
                          "fraction of blocks frozen", "Oscillation-aware block freezing",
                          "no adaptation.csv in these runs (BAME only)", ylim_fraction=True)


def _nm_weights(run: pd.Series, masks: pd.DataFrame) -> float:
    """Number of N:M weights of a run: from sparsify.csv shapes, else from masks.csv ratios."""
    sp = load_sparsify(run)
    if {"sparse", "shape"} <= set(sp.columns):
        sparse = sp[sp["sparse"].astype(str).str.lower() == "true"]
        if len(sparse):
            return float(sum(np.prod([int(d) for d in str(shape).split("x")]) for shape in sparse["shape"]))
    sized = (masks["flips"] / masks["flip_fraction"]).where(masks["flip_fraction"] > 0)
    return float(sized.groupby(masks["layer"]).max().sum())


def _run_steps(run: pd.Series, metrics: pd.DataFrame, masks: pd.DataFrame) -> int:
    steps = run.get("steps") if isinstance(run, pd.Series) else None
    if steps is None or not np.isfinite(float(steps)):
        steps = max(float(metrics["step"].max()) if len(metrics) else 0.0,
                    float(masks["step"].max()) + 1 if len(masks) else 0.0)
    return int(steps)


def _flips_curve(run: pd.Series, value: str) -> pd.DataFrame:
    """Flips per training step (0-based, as in masks.csv), zeros filled in for steps without rows.

    masks.csv only has rows for steps where some mask changed; a run records flips at all when its
    metrics rows carry ``sad_fraction`` (the recorder's scalar for runs with N:M layers).
    """
    masks = load_masks(run)
    metrics = load_metrics(run)
    recorded = "sad_fraction" in metrics and metrics["sad_fraction"].notna().any()
    if masks.empty and not recorded:
        return pd.DataFrame(columns=["step", value])
    steps = _run_steps(run, metrics, masks)
    flips = masks.groupby("step")["flips"].sum().reindex(np.arange(steps), fill_value=0).astype(float)
    if value == "flip_fraction":
        n = _nm_weights(run, masks)
        flips = flips / n if n > 0 else flips * math.nan
    elif value == "cumulative":
        flips = flips.cumsum()
    return pd.DataFrame({"step": flips.index.to_numpy(), value: flips.to_numpy(float)})


def mask_flips(runs: RunsLike, value: str = "flips", completed_only: bool = True,
               logy: bool = False) -> Figure:
    """Mask flips (SAD: mask entries changed by a step), all N:M layers together, at every step.

    ``value``: ``'flips'`` (count per step, from masks.csv; steps without rows changed nothing and
    are drawn as 0), ``'flip_fraction'`` (the count over the run's N:M weights) or ``'cumulative'``
    (flips since the start). Runs without N:M layers (dense) are left out; a run with N:M layers
    whose masks never changed (static) is a line at 0. The y axis is linear from 0 (counts and fractions are
    never negative); ``logy`` makes it logarithmic (steps without flips then drop out).
    """
    labels = {"flips": "mask flips per step (SAD)", "flip_fraction": "fraction of N:M weights flipped",
              "cumulative": "cumulative mask flips"}
    if value not in labels:
        raise ValueError(f"value must be one of {list(labels)}, got {value!r}")
    return _per_step_plot(_runs(runs, completed_only), lambda r: _flips_curve(r, value), value, labels[value],
                          "Mask flips", "no mask flips recorded in these runs (no N:M layers?)", logy=bool(logy),
                          nonnegative=True)


def _layer_flips(run: pd.Series) -> pd.DataFrame:
    """[steps, layers]: each layer's flips so far as a fraction of its weights (masks.csv's
    ``flip_fraction`` summed over steps; steps without rows changed nothing)."""
    masks = load_masks(run)
    if masks.empty:
        return pd.DataFrame()
    steps = _run_steps(run, load_metrics(run), masks)
    table = masks.pivot_table(index="step", columns="layer", values="flip_fraction", aggfunc="sum", sort=False)
    return table.reindex(np.arange(steps), fill_value=0.0).fillna(0.0).cumsum()


def layer_flips(runs: RunsLike, completed_only: bool = True) -> Figure:
    """Per-layer mask flips (SAD) over steps: one panel per group, one line per N:M layer.

    Each line is the layer's mask flips since the start as a fraction (in %) of its weights, mean over the
    group's seeds (gid ``<group>|<layer>``); colours run from the first layer (dark) to the last
    (light). It answers which layers change their masks, when, and how much. Groups whose masks never
    changed (static, dense) are left out.
    """
    df = _runs(runs, completed_only)
    curves: dict[str, list[pd.DataFrame]] = {}
    if not df.empty:
        labels = group_labels(df)
        for label, _, _ in _group_order(df, labels):
            tables = [_layer_flips(run) for _, run in df[labels == label].iterrows()]
            tables = [t for t in tables if not t.empty and t.to_numpy().any()]
            if tables:
                curves[label] = tables
    layers = list(dict.fromkeys(layer for tables in curves.values() for t in tables for layer in t.columns))
    ncols = 2 if len(curves) > 3 else 1
    nrows = max(1, math.ceil(len(curves) / ncols))
    with style():
        height = max(2.3 * nrows + 0.6, 0.19 * len(layers) + 0.9)  # room for the legend of every layer
        fig, axes = new_figure(5.0 + 3.6 * ncols, height, nrows=nrows, ncols=ncols, sharex=True, squeeze=False)
        if not curves:
            empty(axes[0, 0], "no mask flips in these runs")
            return fig
        cmap = colormaps["viridis"]
        colors = {layer: cmap(0.9 * i / max(1, len(layers) - 1)) for i, layer in enumerate(layers)}
        for ax in axes.flat[len(curves):]:
            ax.axis("off")
        for ax, (label, tables) in zip(axes.flat, curves.items()):
            mean = pd.concat(tables).groupby(level=0).mean()
            for layer in mean.columns:
                (line,) = ax.plot(mean.index, mean[layer], color=colors[layer], lw=1.4, label=layer)
                line.set_gid(f"{label}|{layer}")
            ax.set_title(f"{label} (n={len(tables)})", loc="left")
            ax.set_ylabel("weights flipped")
            ax.set_ylim(bottom=0.0)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        for column in axes.T:  # the lowest panel of each column carries the step axis
            last = [ax for ax in column if ax.axison][-1]
            last.set_xlabel("training step")
            last.xaxis.set_tick_params(labelbottom=True)
            last.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [Line2D([], [], color=colors[layer], lw=1.4) for layer in layers]
        legend_beside(fig, handles, layers, title="layer")
        fig.suptitle("Mask flips per layer since the start (mean over seeds)")
    return fig
