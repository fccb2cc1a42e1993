"""Check a figure's text layout: no text outside the figure, no two texts overprinting each other.

It renders the figure (Agg) and looks at every text that was actually drawn: titles, axis labels, tick
labels, legend entries and titles, offset texts ("1e11"), colour-bar labels, annotations. Tick labels of
ticks outside the view are not drawn and so not checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

__all__ = ["text_problems"]

TOLERANCE_PX = 0.5  # a box may leave the figure by this much (anti-aliasing, rounding)
MIN_GAP_PT = 2.5  # two texts closer than this (a third of a space at 8 pt) read as one ("300 MFLOPs400 MFLOPs")


@contextlib.contextmanager
def _recording_drawn_texts(drawn: list[Text]) -> Iterator[None]:
    """While active, every Text that draws itself with a visible, non-empty string is appended to ``drawn``."""
    original = Text.draw

    def draw(self: Text, renderer) -> None:  # noqa: ANN001 - matplotlib's renderer type
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        original(self, renderer)

    Text.draw = draw
    try:
        yield
    finally:
        Text.draw = original


def _describe(text: Text) -> str:
    return repr(text.get_text()[:40])


def text_problems(fig: Figure) -> list[str]:
    """Every text that lies (partly) outside the figure or overlaps another text's box (or comes closer
    to it than ``MIN_GAP_PT``), as sentences.

    An empty list means the layout is clean. The figure is drawn on an Agg canvas for this (its own
    canvas is left in place).
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    drawn: list[Text] = []
    with _recording_drawn_texts(drawn):
        canvas.draw()
    renderer = canvas.get_renderer()
    figure_box = fig.bbox
    gap = MIN_GAP_PT * fig.dpi / 72.0
    boxes: list[tuple[Text, Bbox]] = []
    seen: set[int] = set()
    for text in drawn:
        if id(text) in seen:
            continue
        seen.add(id(text))
        boxes.append((text, Text.get_window_extent(text, renderer)))

    problems = []
    for text, box in boxes:
        if (box.x0 < figure_box.x0 - TOLERANCE_PX or box.y0 < figure_box.y0 - TOLERANCE_PX
                or box.x1 > figure_box.x1 + TOLERANCE_PX or box.y1 > figure_box.y1 + TOLERANCE_PX):
            problems.append(f"text {_describe(text)} lies outside the figure ({_fmt(box)} vs {_fmt(figure_box)})")
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            overlap_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            if overlap_x > -gap and overlap_y > -gap:
                problems.append(f"text {_describe(a)} overlaps text {_describe(b)} (or leaves no gap)")
    return problems


def _fmt(box: Bbox) -> str:
    return f"[{box.x0:.0f}, {box.y0:.0f}, {box.x1:.0f}, {box.y1:.0f}] px"
