"""``bame report DIR [--out report.md|report.html]``: the report of any folder of runs.

Tables (methods: mean ± std over seeds, training FLOPs x dense and x SR-STE; readings against the
static control), figures beside the report, and each group's run ids and commands; see
:func:`analysis.write_report`. Here the settings of a group are named relative to this version's config
defaults, and a config key an older run lacks counts as its default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from .config import Config, to_dict
from .console import EXIT_USAGE, error

__all__ = ["add_report_parser", "config_defaults", "write_report"]


def config_defaults() -> dict[str, Any]:
    """Every config key of this version (dotted) with its default, as the run table names them."""
    from analysis.readers import flatten

    return {k: v for k, v in flatten(to_dict(Config())).items() if k != "name"}


def write_report(runs_root: str | Path, out: str | Path | None = None, title: Optional[str] = None,
                 family_by: Optional[list[str]] = None) -> Path:
    """:func:`analysis.write_report` with this version's defaults as the reference reading."""
    from analysis import write_report as write

    defaults = config_defaults()
    return write(runs_root, out, title=title or f"Runs under {runs_root}", reference=defaults,
                 defaults=defaults, family_by=family_by,
                 reference_source="this version's config defaults")


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report`` to a ``bame`` sub-command parser; sets ``func=cli_report``."""
    p = subparsers.add_parser("report", help="tables, figures and commands of a folder of runs, as markdown or HTML",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", metavar="DIR", help="a folder of run folders (searched recursively) or one run")
    p.add_argument("--out", "-o", metavar="FILE", help="report.md or report.html (default DIR/report.md); "
                   "figures go to figures/ beside it; only a report written by bame is ever replaced")
    p.add_argument("--title", help="the report's title (default: 'Runs under DIR')")
    p.add_argument("--family", action="append", metavar="KEY",
                   help="a config key (e.g. method.bame.t_f_fraction) along which groups form a family: "
                        "joined by a line in the accuracy-vs-FLOPs figure (repeatable)")
    p.set_defaults(func=cli_report)
    return p


def cli_report(args: argparse.Namespace) -> int:
    from analysis.report import ReportError

    root = Path(args.runs_dir)
    if not root.is_dir():
        error(f"{str(root)!r} is not a folder of runs (it does not exist or is a file)")
        return EXIT_USAGE
    try:
        path = write_report(root, args.out, args.title, args.family)
    except ReportError as err:
        error(str(err))
        return EXIT_USAGE
    print(path)
    return 0
