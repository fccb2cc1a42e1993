"""A markdown report of a folder of runs: the paper table and every figure (PNG linked, PDF beside)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt

from . import figures
from .published import load_published
from .readers import FLOPS_CONVENTION, load_runs
from .tables import paper_table, to_markdown

__all__ = ["write_report"]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def write_report(runs_root: str | Path, out_dir: str | Path, title: str = "BAME runs",
                 baseline: str = "srste", dense: str = "dense") -> Path:
    """Write ``<out_dir>/report.md`` and ``<out_dir>/figures/*.{png,pdf}``; returns the report's path.

    The report holds: the paper table of the completed runs (markdown, with its caption and the
    FLOPs convention), the runs that did not complete, accuracy vs training FLOPs, the per-phase
    FLOPs breakdown, mask flips, the fraction of frozen blocks and one oscillation heatmap per BAME
    run (figures without data are left out and listed), and the published reference numbers.
    """
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(runs_root)
    done = runs[runs["status"] == "completed"]
    lines = [f"# {title}", "",
             (f"Runs under `{runs_root}`: {len(runs)} found, {len(done)} completed. "
              f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."), "",
             (f"**FLOPs convention.** {FLOPS_CONVENTION} Training FLOPs are exact per-step counts "
              f"(forward, input gradient, weight gradient, mask adaptation), ideal view unless stated."), ""]

    lines += ["## Results", ""]
    if done.empty:
        lines += ["No completed runs.", ""]
    else:
        lines += [to_markdown(paper_table(done, baseline=baseline, dense=dense)), ""]
    unfinished = runs[runs["status"] != "completed"]
    if len(unfinished):
        lines += ["Runs not completed (left out of the table and figures):", ""]
        cols = {"run_id": "run", "status": "status", "method.name": "method", "method.pattern": "pattern",
                "train.seed": "seed", "relpath": "folder"}
        lines += [to_markdown(unfinished[list(cols)].rename(columns=cols), caption=False), ""]

    made: list[tuple[str, str, Path]] = []
    skipped: list[str] = []

    def emit(name: str, caption: str, fig: plt.Figure) -> None:
        try:
            if figures.has_data(fig):
                png, _ = figures.save(fig, fig_dir / name)
                made.append((name, caption, png))
            else:
                skipped.append(caption)
        finally:
            plt.close(fig)

    if not done.empty:
        emit("accuracy_vs_flops", "Test top-1 against cumulative training FLOPs (thin: runs; thick: "
             "mean over seeds, band ±1 std)", figures.accuracy_vs_flops(done))
        emit("phase_breakdown", "Training FLOPs per phase (ideal, mean over seeds)",
             figures.phase_breakdown(done))
        emit("phase_breakdown_executed", "Training FLOPs per phase (executed by this machine's kernels)",
             figures.phase_breakdown(done, view="executed"))
        emit("mask_flips", "Mask flips (SAD) per training step, all N:M layers", figures.mask_flips(done))
        emit("mask_flips_cumulative", "Cumulative mask flips, all N:M layers",
             figures.mask_flips(done, value="cumulative"))
        emit("frozen_fraction", "Fraction of blocks frozen by OBF", figures.frozen_fraction(done))
        for _, run in done[done["method.name"] == "bame"].iterrows():
            emit(f"oscillation_{run['run_id']}", f"Block oscillation frequency per layer, run "
                 f"{run['run_id']}", figures.oscillation_heatmaps(run))

    lines += ["## Figures", ""]
    for name, caption, png in made:
        lines += [f"### {caption}", "", f"![{name}]({_rel(png, out)})  ",
                  f"PDF: [{name}.pdf]({_rel(png.with_suffix('.pdf'), out)})", ""]
    if skipped:
        lines += ["Not drawn (no data in these runs): " + "; ".join(skipped) + ".", ""]

    pub = load_published()
    lines += ["## Published numbers", "",
              "For reference only: these come from the cited papers, not from runs here.", "",
              to_markdown(pub, floatfmt=".1f", caption=False), ""]

    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
