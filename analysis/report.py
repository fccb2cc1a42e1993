"""The report of a folder of runs (``bame report DIR``): tables, figures, and what produced each group.

It holds: the methods table (mean ± std over seeds, training FLOPs x dense and x SR-STE), the readings
table against the static control with its forest plot, final top-1 against training FLOPs (Pareto), the
FLOPs per phase, training loss, per-layer mask flips, BAME's frozen blocks and oscillation heatmaps, each
group's run ids and commands, the runs that did not complete, and the published reference numbers.
Figures go to ``figures/`` beside the report (PNG, linked, and PDF).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from . import figures, heatmaps, phases
from .forest import forest_plot
from .groups import fill_defaults, run_points
from .pareto import group_means, pareto_scatter
from .published import load_published
from .readers import FLOPS_CONVENTION, find_run_folders, load_manifest, load_runs
from .readings import format_readings_table, readings_table
from .render import MARKER, Heading, Image, Items, Table, Text, render
from .style import has_data, save
from .tables import format_paper_table, paper_table

__all__ = ["ReportError", "report_path", "write_report"]

SUFFIXES = (".md", ".html")


class ReportError(ValueError):
    """The report cannot be written as asked; the message says what to change."""


def report_path(runs_root: str | Path, out: str | Path | None = None) -> Path:
    """Where the report goes: ``out`` when it ends in .md or .html, ``out/report.md`` for a folder
    (a path without a suffix), ``<runs_root>/report.md`` without ``out``."""
    if out is None:
        return Path(runs_root) / "report.md"
    out = Path(out)
    if out.suffix.lower() in SUFFIXES:
        return out
    if out.suffix and not out.is_dir():
        raise ReportError(f"--out {str(out)!r}: a report is .md or .html (or give a folder for report.md)")
    return out / "report.md"


# A sentence of every report written before MARKER existed (a demo's old report.md may be rewritten).
_OLD_REPORT = "For reference only: these come from the cited papers, not from runs here."


def _check_writable(path: Path) -> None:
    """Refuse to overwrite a file that is not a report written here (nothing a user made is replaced)."""
    if path.is_dir():
        raise ReportError(f"{str(path)!r} is a folder: give a file name ending in .md or .html")
    text = path.read_text(errors="replace") if path.exists() else MARKER
    if MARKER not in text and _OLD_REPORT not in text:
        raise ReportError(f"{str(path)!r} exists and was not written by bame report: choose another --out "
                          f"or move that file away")


def _command(manifest: Mapping[str, Any]) -> str:
    """The run's command line as a shell would read it (a sweep's '# label' kept as a comment)."""
    argv = [str(a) for a in manifest.get("command") or []]
    if "#" in argv:
        i = argv.index("#")
        return shlex.join(argv[:i]) + "  # " + " ".join(argv[i + 1:])
    return shlex.join(argv) if argv else "(not recorded)"


def _group_runs(runs: pd.DataFrame, points: pd.DataFrame) -> list:
    """Per group (in table order), its run ids, seeds and commands (from manifest.json)."""
    paths = dict(zip(runs["run_id"], runs["path"]))
    blocks: list = []
    for group in group_means(points)["group"]:
        g = points[points["group"] == group]
        lines = [f"`{r['run_id']}` (seed {r['seed']}): `{_command(load_manifest(paths[r['run_id']]))}`"
                 for _, r in g.sort_values("seed").iterrows()]
        blocks += [Text(f"**{group}** ({len(g)} run{'s' if len(g) > 1 else ''})"), Items(tuple(lines))]
    return blocks


def _curve_runs(runs: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """The runs the curves show: per method and pattern, the group at the reference reading (readings
    are compared in the forest plot), or every group where none is at it."""
    at_reference = points[points["settings"] == ""]
    cells = set(zip(at_reference["method"], at_reference["pattern"]))
    keep = points[(points["settings"] == "") | ~pd.Series(list(zip(points["method"], points["pattern"])),
                                                          index=points.index).isin(cells)]
    return runs[runs["run_id"].isin(set(keep["run_id"]))]


class _Figures:
    """Draws, saves (PNG + PDF) and closes each figure; keeps the ones with data as report blocks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.images: list[Image] = []
        self.skipped: list[str] = []

    def add(self, name: str, caption: str, fig: plt.Figure) -> None:
        try:
            if has_data(fig):
                png, _ = save(fig, self.folder / name)
                self.images.append(Image(png, caption))
            else:
                self.skipped.append(caption)
        finally:
            plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")[:80]


def _draw_figures(runs: pd.DataFrame, points: pd.DataFrame, readings: pd.DataFrame, folder: Path) -> _Figures:
    out = _Figures(folder)
    out.add("pareto", "Final test top-1 against training FLOPs: one marker per group, ±1 std over seeds; "
            "dashed: the Pareto front", pareto_scatter(points))
    if len(readings):
        out.add("readings", "Change in top-1 against the static control (shaded: its ±1 std)",
                forest_plot(readings))
    out.add("phase_breakdown", "Training FLOPs per phase (ideal, mean over seeds)", phases.phase_breakdown(runs))
    out.add("phase_breakdown_executed", "Training FLOPs per phase as executed by this machine's kernels",
            phases.phase_breakdown(runs, view="executed"))
    shown = _curve_runs(runs, points)
    out.add("training_loss", "Training loss per pattern (dense in each panel)", figures.training_loss(shown))
    out.add("layer_flips", "Mask flips per layer since the start, as a fraction of the layer's weights",
            figures.layer_flips(shown))
    bame = shown[shown["method.name"] == "bame"]
    if len(bame):
        out.add("frozen_fraction", "Fraction of blocks frozen by OBF", figures.frozen_fraction(bame))
        labels = points.set_index("run_id")["group"]
        for group, g in bame.groupby(bame["run_id"].map(labels), sort=False):
            run = g.sort_values("train.seed").iloc[0]
            out.add(f"oscillation_{_slug(group)}", f"Block oscillation frequency per layer, {group} "
                    f"(run {run['run_id']})", heatmaps.oscillation_heatmaps(run))
    return out


def write_report(runs_root: str | Path, out: str | Path | None = None, title: str = "BAME runs",
                 baseline: str = "srste", dense: str = "dense", control: str = "static",
                 reference: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                 family_by: str | Sequence[str] | None = None,
                 reference_source: str = "each option's most common value") -> Path:
    """Write the report of every run folder under ``runs_root`` (nested folders too); returns its path.

    ``out``: a ``.md`` or ``.html`` file, or a folder for ``report.md`` (default ``<runs_root>/report.md``);
    figures go to ``figures/`` beside it. An existing file at ``out`` is replaced only if it is a
    report written here. ``reference``: the reading that settings are relative to (dotted config keys;
    each key's most common value where it names none); ``defaults``: values for config keys that older
    runs lack (see :func:`analysis.fill_defaults`); ``family_by``: key(s) along which groups form a
    family (a line in the Pareto figure); ``reference_source``: what the reference reading is, in words.
    Raises :class:`ReportError` before writing anything when
    there is no run folder or the path is not a report's.
    """
    root = Path(runs_root)
    path = report_path(root, out)
    _check_writable(path)
    if not find_run_folders(root):
        raise ReportError(f"no run folders under {str(root)!r} (a run folder holds manifest.json)")
    runs = load_runs(root)
    if defaults:
        runs = fill_defaults(runs, defaults)
    families = [family_by] if isinstance(family_by, str) else list(family_by or [])
    unknown = [k for k in families if k not in runs]
    if unknown:
        raise ReportError(f"no config key {unknown[0]!r} in these runs: a family is named by a dotted config "
                          f"key, e.g. method.bame.t_f_fraction")
    done = runs[runs["status"] == "completed"]
    blocks: list = [Heading(title, 1), Text(
        f"Runs under `{root}`: {len(runs)} found, {len(done)} completed. "
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. **FLOPs:** exact ledger counts per step "
        f"(forward, input gradient, weight gradient, mask adaptation), ideal view unless stated; "
        f"{FLOPS_CONVENTION}")]

    blocks.append(Heading("Methods"))
    if done.empty:
        blocks.append(Text("No completed runs."))
        images = _Figures(path.parent / "figures")
    else:
        table = paper_table(done, baseline=baseline, dense=dense, reference=reference)
        blocks.append(Table(format_paper_table(table, details=True), table.attrs["caption"]))
        if table.attrs["group_keys"]:
            blocks.append(Text(f"Settings name the options that vary between these groups "
                               f"({', '.join(f'`{k}`' for k in table.attrs['group_keys'])}) where a group's value "
                               f"differs from the reference reading: {reference_source}."))
        points = run_points(done, by=table.attrs["group_keys"], reference=reference, family_by=family_by,
                            dense=dense)
        readings = readings_table(points, control=control)
        if len(readings):
            blocks += [Heading(f"Readings against the {control} control"),
                       Table(format_readings_table(readings), readings.attrs["caption"])]
        images = _draw_figures(done, points, readings, path.parent / "figures")

    blocks.append(Heading("Figures"))
    blocks += images.images
    if images.skipped:
        blocks.append(Text("Not drawn (no data in these runs): " + "; ".join(images.skipped) + "."))

    if not done.empty:
        blocks += [Heading("Groups: runs and commands"),
                   Text("Each run repeats with `bame train --config <run folder>/config.yaml`.")]
        blocks += _group_runs(done, points)
    unfinished = runs[runs["status"] != "completed"]
    if len(unfinished):
        cols = {"run_id": "run", "status": "status", "method.name": "method", "method.pattern": "pattern",
                "train.seed": "seed", "relpath": "folder"}
        blocks += [Heading("Runs not completed"), Text("Left out of the tables and figures."),
                   Table(unfinished[list(cols)].rename(columns=cols))]
    blocks += [Heading("Published numbers"), Text("For reference only: these come from the cited papers, "
                                                  "not from runs here."), Table(load_published(), floatfmt=".1f")]

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(blocks, path, title))
    return path
