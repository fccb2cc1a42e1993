"""Print the tables of docs/results.md from the study's run folders, and save its figures (PNG + PDF).

    .venv/bin/python scripts/results_tables.py runs/study [more folders ...] [--figures docs/figures]

Several folders are read together (section 3 adds the 10-epoch controls of the learning-block bundle to
its own readings). Only BAME's first family of readings is tabled: runs that change one of its other
options (the learning-block readings: ``designated_grad``, ``designation``...) are left out.

The tables and figures are those of ``bame report`` (analysis/), with the study's choices: the readings
at 1:16 are named relative to method.md's first defaults, and the methods table holds BAME at the
current defaults only. For the whole report of a folder: ``bame report runs/study``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import pandas as pd

from analysis import (
    fill_defaults,
    format_paper_table,
    format_readings_table,
    load_adaptation,
    load_runs,
    paper_table,
    readings_table,
    run_points,
    to_markdown,
)

# The reading the ablation table's rows are relative to (method.md's first defaults), and its columns.
FIRST_READING = {"lma": "taylor", "rho": 0.05, "interval_steps": 100, "regrow": "stored", "obf": True,
                 "obf_bias_correction": False, "tau": 0.5, "min_changes": 2, "selection": "freeze_then_topk",
                 "t_f_fraction": 0.5, "block_rows": 1, "score_steps": 1}
BAME_KEYS = [f"method.bame.{k}" for k in FIRST_READING]
SETTINGS_HEADER = "settings (changed from lma=taylor, rho=0.05, T=100, t_f=0.5)"


def current_bame_defaults() -> dict:
    """The current defaults of the readings (dotted keys)."""
    from bame.config import BameConfig

    return {key: getattr(BameConfig(), key.split(".")[-1]) for key in BAME_KEYS}


def with_new_options(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs from before a BAME option existed lack its column: they ran what its default does."""
    return fill_defaults(runs, current_bame_defaults())


def first_family(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of other methods, and BAME's runs whose options outside the readings' keys are defaults."""
    from bame.config import BameConfig

    others = {f"method.bame.{f.name}": getattr(BameConfig(), f.name) for f in fields(BameConfig)
              if f"method.bame.{f.name}" not in BAME_KEYS}
    runs = fill_defaults(runs, others)
    keep = pd.Series(True, index=runs.index)
    for key, default in others.items():
        keep &= runs[key].map(lambda v, d=default: v == d or (v is None and d is None)
                              or (isinstance(v, float) and d is None and pd.isna(v)))
    return runs[(runs["method.name"] != "bame") | keep]


def ablation(runs: pd.DataFrame, pattern: str = "1:16") -> pd.DataFrame:
    """Each BAME reading at ``pattern`` and SR-STE against the static control, over seeds."""
    runs = runs[(runs["status"] == "completed") & (runs["method.pattern"] == pattern)
                & runs["method.name"].isin(["static", "srste", "bame"])]
    return readings_table(run_points(runs, by=BAME_KEYS, reference=dict(zip(BAME_KEYS, FIRST_READING.values()))))


def ablation_table(runs: pd.DataFrame, pattern: str = "1:16") -> str:
    shown = format_readings_table(ablation(runs, pattern), reference_label="(the first default)")
    shown = shown.drop(columns=["pattern"]).rename(columns={"method": "run", "settings": SETTINGS_HEADER})
    return to_markdown(shown, caption=False, pad=False).rstrip("\n")


def mask_changes_table(runs: pd.DataFrame, pattern: str = "1:16") -> str:
    """Per BAME reading at ``pattern``: what its adaptation steps did over the whole run (adaptation.csv),
    mean over seeds [min, max]: kept weights swapped, A->B->A oscillation events, blocks frozen by OBF at
    the last adaptation step."""
    bame = runs[(runs["status"] == "completed") & (runs["method.pattern"] == pattern)
                & (runs["method.name"] == "bame")]
    points = run_points(bame, by=BAME_KEYS, reference=dict(zip(BAME_KEYS, FIRST_READING.values())))
    rows = []
    for (_, run), settings in zip(bame.iterrows(), points["settings"]):
        adapt = load_adaptation(run)
        last = adapt[adapt["step"] == adapt["step"].max()]
        rows.append({"settings": settings or "(the first default)", "swaps": adapt["swaps"].sum(),
                     "A->B->A events": adapt["oscillation_events"].sum(), "frozen blocks": last["frozen_blocks"].sum()})
    per_run = pd.DataFrame(rows)
    stats = per_run.groupby("settings", sort=False).agg(["mean", "min", "max"])
    shown = pd.DataFrame(index=stats.index)
    for col in ("swaps", "A->B->A events", "frozen blocks"):
        shown[col] = [f"{m:.0f} [{lo:.0f}, {hi:.0f}]" for m, lo, hi in stats[col].itertuples(index=False)]
    shown.insert(0, "seeds", per_run.groupby("settings", sort=False).size())
    shown = shown.sort_values("settings").reset_index().rename(columns={"settings": SETTINGS_HEADER})
    return to_markdown(shown, caption=False, pad=False).rstrip("\n")


def current_defaults(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed runs of every method, BAME only with the current defaults of its readings."""
    is_default = pd.Series(True, index=runs.index)
    for key, default in current_bame_defaults().items():
        is_default &= runs[key].map(lambda v, d=default: v == d)
    return runs[(runs["status"] == "completed") & ((runs["method.name"] != "bame") | is_default)]


def methods_table(runs: pd.DataFrame) -> str:
    """Method x pattern with the current defaults: top-1, training FLOPs vs dense and vs SR-STE."""
    table = format_paper_table(paper_table(current_defaults(runs), by=[]))
    return to_markdown(table, caption=False, pad=False).rstrip("\n")


def save_figures(runs: pd.DataFrame, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from analysis import forest_plot, pareto_scatter, phase_breakdown, save

    methods = current_defaults(runs)
    save(pareto_scatter(run_points(methods, by=[])), f"{out}/study_accuracy_vs_flops")
    save(phase_breakdown(methods), f"{out}/study_phase_breakdown")
    save(forest_plot(ablation(runs), reference_label="(the first default)"), f"{out}/study_ablation_1of16")


def main(roots: list[str], figures: str | None = None) -> None:
    runs = first_family(with_new_options(pd.concat([load_runs(r) for r in roots], ignore_index=True)))
    if figures:
        save_figures(runs, figures)
    print("## Readings of BAME at 1:16\n")
    print(ablation_table(runs))
    print("\n## What the readings' adaptation steps did (mean over seeds [min, max])\n")
    print(mask_changes_table(runs))
    print("\n## Methods x patterns (current defaults)\n")
    print(methods_table(runs))
    print("\nFLOPs: exact ledger counts, ideal view, all phases; FLOPs = 2 x MACs.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=["runs/study"], help="folders of runs (or bundles' parts)")
    parser.add_argument("--figures", help="save the figures here (PNG + PDF)")
    args = parser.parse_args()
    main(args.roots, args.figures)
