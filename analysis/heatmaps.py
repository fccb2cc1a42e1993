"""Heatmaps of BAME's per-block oscillation frequency ``f_b`` over its adaptation steps, per layer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from matplotlib.figure import Figure

from .readers import RunLike, load_adaptation, load_block_arrays, run_path
from .style import empty, new_figure, style

__all__ = ["oscillation_heatmaps"]


def _bin_rows(a: np.ndarray, max_rows: int) -> np.ndarray:
    """Average consecutive rows of ``a`` [R, C] into at most ``max_rows`` rows (np.array_split bins)."""
    if a.shape[0] <= max_rows:
        return a
    return np.stack([chunk.mean(axis=0) for chunk in np.array_split(a, max_rows, axis=0)])


def _step_ticks(ax, steps) -> None:  # noqa: ANN001 - an Axes and a sequence of step numbers
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[t]) for t in ticks])


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
    with style():
        fig, axes = new_figure(max(5.0, 3.4 * ncols + 0.8), 2.8 * nrows + 0.7, nrows=nrows, ncols=ncols,
                               squeeze=False)
        vmax = max(float(np.nanmax(a["frequency"])) for a in arrays.values()) or 1.0  # f_b is in [0, 1]
        im = None
        for ax, name in zip(axes.flat, names):
            steps = arrays[name]["step"]
            freq = arrays[name]["frequency"].astype(float).T  # [blocks, snapshots]
            if sort_blocks:
                freq = freq[np.argsort(-freq[:, -1], kind="stable")]
            n_blocks = freq.shape[0]
            shown = _bin_rows(freq, max_rows)
            im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax,
                           extent=(-0.5, len(steps) - 0.5, n_blocks, 0))  # y: block rank, binned
            im.set_gid(name)
            binned = f"{n_blocks} blocks in {shown.shape[0]} bins" if shown.shape[0] < n_blocks else \
                f"{n_blocks} blocks"
            ax.set_title(f"{name}\n{binned}", fontsize=8)
            _step_ticks(ax, steps)
            ax.set_xlabel("adaptation step")
            ax.set_ylabel("block" + (" (by final f_b)" if sort_blocks else ""))
            ax.grid(False)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="oscillation frequency f_b")
        fig.suptitle(f"Block oscillation frequency\n{run_id}")
    return fig


def _oscillation_from_adaptation(run: RunLike, run_id: str, layers: Iterable[str] | None) -> Figure:
    with style():
        fig, ax = new_figure(6.4, 4.0)
        a = load_adaptation(run)
        if layers is not None:
            a = a[a["layer"].isin(list(layers))]
        if a.empty or "freq_mean" not in a:
            empty(ax, "no blocks/ snapshots and no adaptation.csv")
            return fig
        table = a.pivot_table(index="layer", columns="step", values="freq_mean", aggfunc="mean", sort=False)
        im = ax.imshow(table.to_numpy(float), aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
        im.set_gid("adaptation.csv:freq_mean")
        ax.set_yticks(range(len(table.index)))
        ax.set_yticklabels(table.index)
        _step_ticks(ax, list(table.columns))
        ax.set_xlabel("adaptation step")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="mean oscillation frequency")
        ax.set_title(f"Mean block oscillation frequency per layer\n{run_id}")
    return fig
