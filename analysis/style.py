"""The one style of every figure: fonts, colours per method, markers per pattern, FLOPs axes, legends, saving.

Every figure function draws inside ``with style():`` and uses constrained layout, so that titles, labels
and legends fit inside the figure (``analysis.layout.text_problems`` checks it; the tests run it on every
figure function). FLOPs axes read in SI units ("1.2 TFLOPs") and never carry an offset text ("1e11").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

__all__ = ["METHOD_COLORS", "PATTERN_MARKERS", "empty", "flops_axis", "group_styles", "has_data",
           "legend_beside", "legend_inside_or_below", "marker_size", "method_color", "new_figure", "pattern_marker", "save", "style"]

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.formatter.useoffset": False,  # never a "+1e11" offset over the axis
    "axes.formatter.limits": (-4, 5),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text
}

# Okabe-Ito colours (told apart with the common colour-vision deficiencies); dense is black.
METHOD_COLORS = {"dense": "#000000", "static": "#999999", "ste": "#56B4E9", "srste": "#0072B2",
                 "asp": "#E69F00", "lbc": "#CC79A7", "bimask": "#F0E442", "bame": "#D55E00", "phased": "#009E73"}
_SPARE_COLORS = ("#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#009E73")
PATTERN_MARKERS = {"dense": "*", "2:4": "o", "4:8": "p", "1:4": "s", "2:8": "P", "1:8": "D", "1:16": "^",
                   "1:32": "v"}
_SPARE_MARKERS = ("X", "h", "<", ">", "d", "8")


def method_color(method: str) -> str:
    """The colour of a method in every figure (unknown methods get a spare colour by name)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE_COLORS[sum(map(ord, method)) % len(_SPARE_COLORS)]


def pattern_marker(pattern: str) -> str:
    """The marker of an N:M pattern (``dense`` for dense runs) in every figure."""
    if pattern in PATTERN_MARKERS:
        return PATTERN_MARKERS[pattern]
    return _SPARE_MARKERS[sum(map(ord, pattern)) % len(_SPARE_MARKERS)]


LINESTYLES = ("-", "--", ":", "-.")
MARKER_SCALE = {"*": 1.45, "P": 1.1, "X": 1.1}  # markers that look small at one size


def marker_size(marker: str, size: float) -> float:
    """``size`` for ``marker``, so that every marker looks about as large."""
    return size * MARKER_SCALE.get(marker, 1.0)


def group_styles(groups: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """``{label: {color, marker, linestyle}}`` for groups given as (label, method, pattern), in order:
    the method's colour, the pattern's marker, and a line style per group of one method and pattern
    (readings of a method at one pattern are told apart by their line style)."""
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for label, method, pattern in groups:
        k = seen.get((method, pattern), 0)
        seen[(method, pattern)] = k + 1
        out[label] = {"color": method_color(method), "marker": pattern_marker(pattern),
                      "linestyle": LINESTYLES[k % len(LINESTYLES)]}
    return out


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The shared rc settings; figures are created (and drawn) inside it."""
    with plt.rc_context(RC):
        yield


def new_figure(width: float = 6.4, height: float = 4.0, **subplots: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` with constrained layout (labels and outside legends fit in the figure)."""
    return plt.subplots(figsize=(width, height), layout="constrained", **subplots)


def flops_axis(axis: Axis, label: str) -> None:
    """SI ticks on a FLOPs axis ("320 GFLOPs", "1.2 TFLOPs"): the unit is in every tick, none elsewhere."""
    if axis.get_scale() == "linear":
        axis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=3))  # "320 GFLOPs" is wide: few ticks
    axis.set_major_formatter(EngFormatter(unit="FLOPs", sep=" "))
    axis.set_label_text(label)


def legend_beside(fig: Figure, handles: Sequence[Any], labels: Sequence[str], title: str | None = None,
                  loc: str = "outside right upper") -> Any:
    """A figure legend beside the axes, where it hides no data; constrained layout makes room for it."""
    return fig.legend(handles, labels, loc=loc, title=title, alignment="left")


def legend_inside_or_below(ax: Axes, max_inside: int = 6) -> None:
    """The axes' legend: inside (best place) when short, else below the axes in two columns (where
    long labels take no width from the axes)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > max_inside:
        ax.figure.legend(handles, labels, loc="outside lower center", ncols=2)
    else:
        ax.legend(handles, labels)


def empty(ax: Axes, text: str) -> None:
    """An axes that only says why it has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def has_data(fig: Figure) -> bool:
    """Whether a figure plots anything (lines, images, bars or collections) beyond a message."""
    return any(ax.lines or ax.images or ax.patches or ax.collections for ax in fig.axes)


def save(fig: Figure, path_stem: str | Path, formats: Iterable[str] = ("png", "pdf"),
         dpi: int = 150) -> list[Path]:
    """Write ``<path_stem>.png`` and ``<path_stem>.pdf`` (creating folders); returns the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(stem.name + f".{fmt}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
        paths.append(path)
    return paths
