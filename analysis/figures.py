"""Figures from run folders: each function returns a matplotlib Figure; :func:`save` writes PNG + PDF.

Conventions shared by every figure:
- a *group* is a set of seeds of one experiment: (method, pattern) plus whatever config key tells
  runs apart (:func:`analysis.tables.comparable_keys`); its label reads ``bame 2:4`` (dense: ``dense``);
- thin lines are single runs (``Line2D.get_gid()`` is the run id), thick lines are group means
  (gid ``mean:<label>``) with a ±1 std band over seeds;
- FLOPs on an axis are training FLOPs = 2 x MACs, ideal view, cumulative over the run, all phases.

Figures never import the training code and never call ``plt.show``; pick a backend (``Agg`` in
tests and scripts) before importing pyplot elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .readers import (
    PHASES,
    RunLike,
    accuracy_percent,
    load_adaptation,
    load_block_arrays,
    load_flops,
    load_masks,
    load_metrics,
    load_runs,
    load_sparsify,
    run_path,
)
from .tables import DENSE_PATTERN, _applies, _hashable, _method_rank, _pattern_rank, comparable_keys

__all__ = [
    "PHASE_LABELS",
    "accuracy_vs_flops",
    "frozen_fraction",
    "has_data",
    "mask_flips",
    "oscillation_heatmaps",
    "phase_breakdown",
    "phase_totals",
    "run_groups",
    "save",
]

PHASE_LABELS = {"forward": "forward", "input_grad": "input gradient", "weight_grad": "weight gradient",
                "adaptation": "mask adaptation"}
_PHASE_COLORS = {"forward": "#4C72B0", "input_grad": "#55A868", "weight_grad": "#C44E52",
                 "adaptation": "#8172B2"}
RunsLike = Union[str, Path, pd.DataFrame]


# --------------------------------------------------------------------------------------------------
# shared helpers


def _runs(runs: RunsLike, completed_only: bool) -> pd.DataFrame:
    df = load_runs(runs) if isinstance(runs, (str, Path)) else runs
    if completed_only and "status" in df:
        df = df[df["status"] == "completed"]
    return df


def run_groups(runs: pd.DataFrame, dense: str = "dense") -> pd.Series:
    """The group label of each run (index aligned with ``runs``), e.g. ``bame 1:16``, ``dense``.

    Keys that differ between otherwise identical runs (see comparable_keys) are appended as
    ``key=value`` where they apply to the run and differ from the key's most common value (so labels
    name only what a group changed); so are data and model names when the runs span several.
    """
    if runs.empty:
        return pd.Series([], dtype=object, index=runs.index)
    extra = comparable_keys(runs, dense=dense)
    multi = [k for k in ("data.name", "model.name") if k in runs and runs[k].nunique(dropna=False) > 1]
    applies = {k: _applies(runs, k, dense) for k in extra}
    modal = {k: runs.loc[applies[k], k].map(_hashable).mode().iloc[0] for k in extra}

    def label(row: pd.Series) -> str:
        method = str(row["method.name"])
        text = method if method == dense else f"{method} {row['method.pattern']}"
        parts = [str(row[k]) for k in multi]
        parts += [f"{k.split('.')[-1]}={row[k]}" for k in extra
                  if applies[k][row.name] and _hashable(row[k]) != modal[k]]
        return text + (f" ({', '.join(parts)})" if parts else "")

    return runs.apply(label, axis=1)


def _group_order(runs: pd.DataFrame, labels: pd.Series) -> list[str]:
    first = {}
    for idx, lab in labels.items():
        if lab not in first:
            row = runs.loc[idx]
            pattern = DENSE_PATTERN if row["method.name"] == "dense" else row["method.pattern"]
            first[lab] = (_method_rank(row["method.name"]), _pattern_rank(pattern), lab)
    return sorted(first, key=lambda k: first[k])


def _colors(groups: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


MAX_INSIDE_LEGEND = 6  # more entries than this go beside the axes, where they hide no data


def _legend(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > MAX_INSIDE_LEGEND:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def has_data(fig: Figure) -> bool:
    """Whether a figure plots anything (lines, images, bars or collections) beyond a message."""
    return any(ax.lines or ax.images or ax.patches or ax.collections for ax in fig.axes)


def _mean_band(ax: Any, curves: list[pd.DataFrame], x: str, y: str, color: Any, label: str,
               align: str) -> None:
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
    (line,) = ax.plot(xm, ym, color=color, lw=2.0, label=f"{label} (n={len(curves)})")
    line.set_gid(f"mean:{label}")
    if ys_std is not None:
        band = ax.fill_between(xm, ym - ys_std, ym + ys_std, color=color, alpha=0.2, lw=0)
        band.set_gid(f"band:{label}")


def save(fig: Figure, path_stem: str | Path, formats: Iterable[str] = ("png", "pdf"),
         dpi: int = 150) -> list[Path]:
    """Write ``<path_stem>.png`` and ``<path_stem>.pdf`` (creating folders); returns the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(stem.name + f".{fmt}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# accuracy vs training FLOPs


def _eval_curve(run: pd.Series, split: str) -> pd.DataFrame:
    m = load_metrics(run)
    if m.empty or "split" not in m:
        return pd.DataFrame(columns=["flops", "top1"])
    m = m[m["split"].astype(str) == split]
    m = m.dropna(subset=["cum_ideal_macs", "acc"])
    return pd.DataFrame({"flops": 2.0 * m["cum_ideal_macs"].to_numpy(float),
                         "top1": [accuracy_percent(a) for a in m["acc"]],
                         "step": m["step"].to_numpy()})


def _plot_runs_with_means(ax: Any, df: pd.DataFrame, curve_fn: Any, xcol: str, ycol: str, align: str,
                          **line_kw: Any) -> None:
    """One thin line per run (gid = run id) and, per group, a mean line with a ±1 std band."""
    labels = run_groups(df)
    groups = _group_order(df, labels)
    colors = _colors(groups)
    per_group: dict[str, list[pd.DataFrame]] = {g: [] for g in groups}
    for idx, run in df.iterrows():
        curve = curve_fn(run)
        if curve.empty:
            continue
        g = labels[idx]
        per_group[g].append(curve)
        (line,) = ax.plot(curve[xcol], curve[ycol], color=colors[g], lw=0.8, alpha=0.45, **line_kw)
        line.set_gid(str(run["run_id"]))
    for g in groups:
        _mean_band(ax, per_group[g], xcol, ycol, colors[g], g, align=align)


def accuracy_vs_flops(runs: RunsLike, split: str = "test", completed_only: bool = True,
                      logx: bool = False) -> Figure:
    """Top-1 (%) at each evaluation against cumulative training FLOPs (ideal, 2 x MACs).

    One thin line per run (gid = run id; its last point is the run's final accuracy and total
    FLOPs), a thick mean line per group with a ±1 std band (runs aligned by evaluation index).
    """
    df = _runs(runs, completed_only)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if df.empty:
        _empty(ax, "no runs")
        return fig
    _plot_runs_with_means(ax, df, lambda run: _eval_curve(run, split), "flops", "top1", "index",
                          marker=".", ms=3)
    if not ax.lines:
        _empty(ax, f"no '{split}' evaluations in metrics.csv")
        return fig
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (ideal; FLOPs = 2 x MACs)")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.set_title("Accuracy vs training FLOPs")
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# oscillation heatmaps


def _bin_rows(a: np.ndarray, max_rows: int) -> np.ndarray:
    """Average consecutive rows of ``a`` [R, C] into at most ``max_rows`` rows (np.array_split bins)."""
    if a.shape[0] <= max_rows:
        return a
    return np.stack([chunk.mean(axis=0) for chunk in np.array_split(a, max_rows, axis=0)])


def oscillation_heatmaps(run: RunLike, layers: Iterable[str] | None = None, max_rows: int = 256,
                         ncols: int = 3, sort_blocks: bool = True) -> Figure:
    """Per-layer heatmaps of block oscillation frequency ``f_b`` over adaptation steps.

    From ``blocks/step_*.npz``: one panel per layer, x = adaptation step (snapshot), y = block;
    blocks are sorted by their final frequency (highest on top) when ``sort_blocks`` and averaged
    in bins of consecutive rows down to ``max_rows`` (the panel title says so). Without snapshots,
    one panel of per-layer mean frequency (``freq_mean`` of adaptation.csv), layer x step.
    Each image's gid is the layer name (``adaptation.csv:freq_mean`` for the fallback).
    """
    arrays = load_block_arrays(run, layers=layers, fields=("frequency",))
    run_id = run_path(run).name
    if not arrays:
        return _oscillation_from_adaptation(run, run_id, layers)
    names = list(arrays)
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    vmax = max(1e-12, max(float(np.nanmax(a["frequency"])) for a in arrays.values()))
    im = None
    for ax, name in zip(axes.flat, names):
        steps = arrays[name]["step"]
        freq = arrays[name]["frequency"].astype(float).T  # [blocks, snapshots]
        if sort_blocks:
            freq = freq[np.argsort(-freq[:, -1], kind="stable")]
        n_blocks = freq.shape[0]
        shown = _bin_rows(freq, max_rows)
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax,
                       extent=(-0.5, len(steps) - 0.5, shown.shape[0] - 0.5, -0.5))
        im.set_gid(name)
        binned = f", {n_blocks} blocks in {shown.shape[0]} bins" if shown.shape[0] < n_blocks else \
            f", {n_blocks} blocks"
        ax.set_title(f"{name}{binned}", fontsize=8)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("adaptation step", fontsize=8)
        ax.set_ylabel("block" + (" (sorted by final f)" if sort_blocks else ""), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="oscillation frequency f_b")
    fig.suptitle(f"Block oscillation frequency: {run_id}", fontsize=10)
    return fig


def _oscillation_from_adaptation(run: RunLike, run_id: str, layers: Iterable[str] | None) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    a = load_adaptation(run)
    if layers is not None:
        a = a[a["layer"].isin(list(layers))]
    if a.empty or "freq_mean" not in a:
        _empty(ax, "no blocks/ snapshots and no adaptation.csv")
        return fig
    table = a.pivot_table(index="layer", columns="step", values="freq_mean", aggfunc="mean", sort=False)
    im = ax.imshow(table.to_numpy(float), aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
    im.set_gid("adaptation.csv:freq_mean")
    ax.set_yticks(range(len(table.index)))
    ax.set_yticklabels(table.index, fontsize=7)
    ticks = np.unique(np.linspace(0, table.shape[1] - 1, min(table.shape[1], 6)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(table.columns[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("adaptation step")
    fig.colorbar(im, ax=ax, label="mean oscillation frequency")
    ax.set_title(f"Mean block oscillation frequency per layer: {run_id}", fontsize=10)
    fig.tight_layout()
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


def _per_step_plot(df: pd.DataFrame, curve_fn: Any, ycol: str, ylabel: str, title: str,
                   empty_text: str, logy: bool = False, ylim_fraction: bool = False) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if df.empty:
        _empty(ax, "no runs")
        return fig
    _plot_runs_with_means(ax, df, curve_fn, "step", ycol, "x")
    if not ax.lines:
        _empty(ax, empty_text)
        return fig
    if logy:
        ax.set_yscale("symlog", linthresh=1.0)
    if ylim_fraction:
        top = max((float(np.nanmax(line.get_ydata())) for line in ax.lines if len(line.get_ydata())),
                  default=0.0)
        ax.set_ylim(0.0, max(0.01, 1.1 * top))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (0-based index of the step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
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
    steps = run.get("steps") if isinstance(run, pd.Series) else None
    if steps is None or not np.isfinite(float(steps)):
        steps = max(float(metrics["step"].max()) if len(metrics) else 0.0,
                    float(masks["step"].max()) + 1 if len(masks) else 0.0)
    flips = masks.groupby("step")["flips"].sum().reindex(np.arange(int(steps)), fill_value=0).astype(float)
    if value == "flip_fraction":
        n = _nm_weights(run, masks)
        flips = flips / n if n > 0 else flips * math.nan
    elif value == "cumulative":
        flips = flips.cumsum()
    return pd.DataFrame({"step": flips.index.to_numpy(), value: flips.to_numpy(float)})


def mask_flips(runs: RunsLike, value: str = "flips", completed_only: bool = True,
               logy: bool | None = None) -> Figure:
    """Mask flips (SAD: mask entries changed by a step), all N:M layers together, at every step.

    ``value``: ``'flips'`` (count per step, from masks.csv; steps without rows changed nothing and
    are drawn as 0), ``'flip_fraction'`` (the count over the run's N:M weights) or ``'cumulative'``
    (flips since the start). Runs without N:M layers (dense) are left out; a run with N:M layers
    whose masks never changed (static) is a line at 0. ``logy`` defaults to a symlog axis for
    counts.
    """
    labels = {"flips": "mask flips per step (SAD)", "flip_fraction": "fraction of N:M weights flipped",
              "cumulative": "cumulative mask flips"}
    if value not in labels:
        raise ValueError(f"value must be one of {list(labels)}, got {value!r}")
    if logy is None:
        logy = value != "flip_fraction"
    return _per_step_plot(_runs(runs, completed_only), lambda r: _flips_curve(r, value), value, labels[value],
                          "Mask flips", "no mask flips recorded in these runs (no N:M layers?)", logy=logy)


# --------------------------------------------------------------------------------------------------
# per-phase FLOPs


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
    """Stacked bars: training FLOPs per phase (forward, input gradient, weight gradient, adaptation).

    One bar per group, the mean over its seeds of each phase's total from flops.csv; ``view`` is
    ``ideal`` or ``executed``. Each bar segment's gid is ``<group>|<phase>``.
    """
    if view not in ("ideal", "executed"):
        raise ValueError(f"view must be 'ideal' or 'executed', got {view!r}")
    df = _runs(runs, completed_only)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if df.empty:
        _empty(ax, "no runs")
        return fig
    labels = run_groups(df)
    groups = _group_order(df, labels)
    totals = {g: [] for g in groups}
    for idx, run in df.iterrows():
        t = phase_totals(run, view)
        if t.sum() > 0:
            totals[labels[idx]].append(t)
    groups = [g for g in groups if totals[g]]
    if not groups:
        _empty(ax, "no flops.csv in these runs")
        return fig
    means = pd.DataFrame({g: pd.concat(totals[g], axis=1).mean(axis=1) for g in groups}).fillna(0.0)
    fig.set_size_inches(max(6.4, 0.9 * len(groups) + 2.5), 4.2)
    x = np.arange(len(groups))
    bottom = np.zeros(len(groups))
    for phase in means.index:
        values = means.loc[phase].to_numpy(float)
        if not values.any():
            continue
        bars = ax.bar(x, values, bottom=bottom, color=_PHASE_COLORS.get(phase), width=0.6,
                      label=PHASE_LABELS.get(phase, phase))
        for g, patch in zip(groups, bars.patches):
            patch.set_gid(f"{g}|{phase}")
        bottom += values
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"training FLOPs ({view}; 2 x MACs)")
    ax.set_title(f"Training FLOPs per phase ({view}, mean over seeds)")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
