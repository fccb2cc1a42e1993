"""A report as a list of blocks (headings, text, tables, figures, lists), written as markdown or HTML.

Text blocks use a small markdown subset: ``code``, ``**bold**`` and ``[text](link)``; HTML gets the
same through :func:`_inline`. No markdown package is needed.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import pandas as pd

from .tables import to_markdown

__all__ = ["Heading", "Image", "Items", "MARKER", "Table", "Text", "render"]

MARKER = "<!-- written by bame report (analysis.write_report): regenerate it rather than edit it -->"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame = field(compare=False)
    caption: str = ""
    floatfmt: str = ".4g"


@dataclass(frozen=True)
class Image:
    path: Path  # the PNG; a PDF of the same name lies beside it
    caption: str


@dataclass(frozen=True)
class Items:
    lines: tuple[str, ...]


Block = Union[Heading, Text, Table, Image, Items]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _markdown(blocks: list[Block], base: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            out += [b.text, ""]
        elif isinstance(b, Table):
            out += [to_markdown(b.frame, floatfmt=b.floatfmt, caption=False)]
            out += [b.caption, ""] if b.caption else []
        elif isinstance(b, Image):
            png = _rel(b.path, base)
            out += [f"![{b.caption}]({png})  ", f"*{b.caption}* ([PDF]({_rel(b.path.with_suffix('.pdf'), base)}))",
                    ""]
        elif isinstance(b, Items):
            out += [f"- {line}" for line in b.lines] + [""]
    return "\n".join(out + [MARKER, ""])


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    """The markdown subset of text blocks as HTML (escaped first)."""
    text = html.escape(text, quote=False)
    text = _CODE.sub(r"<code>\1</code>", text)
    text = _BOLD.sub(r"<b>\1</b>", text)
    return _LINK.sub(r'<a href="\2">\1</a>', text)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;font-size:0.9em;margin:0.5em 0}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-style:italic;color:#444}code{background:#f5f5f5;padding:0 3px}"""


def _html(blocks: list[Block], base: Path, title: str) -> str:
    out = ["<!DOCTYPE html>", "<html>", "<head>", '<meta charset="utf-8">', MARKER,
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(b.frame.to_html(index=False, escape=True, na_rep="–", border=0,
                                       float_format=lambda v, f=b.floatfmt: format(v, f)))
            if b.caption:
                out.append(f"<p><small>{_inline(b.caption)}</small></p>")
        elif isinstance(b, Image):
            png, pdf = _rel(b.path, base), _rel(b.path.with_suffix(".pdf"), base)
            out.append(f'<figure><img src="{html.escape(png)}" alt="{html.escape(b.caption)}">'
                       f'<figcaption>{html.escape(b.caption)} (<a href="{html.escape(pdf)}">PDF</a>)</figcaption>'
                       f"</figure>")
        elif isinstance(b, Items):
            out.append("<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in b.lines) + "</ul>")
    return "\n".join(out + ["</body>", "</html>", ""])


def render(blocks: list[Block], path: Path, title: str) -> str:
    """The report's text for ``path``: HTML for ``.html``, else markdown (links relative to its folder)."""
    if path.suffix.lower() == ".html":
        return _html(blocks, path.parent, title)
    return _markdown(blocks, path.parent)
