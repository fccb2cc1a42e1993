"""Print the tables of docs/results.md from the study's run folders, and save its figures (PNG + PDF).

    .venv/bin/python scripts/results_tables.py runs/study [docs/figures]

The tables and figures are those of ``bame report`` (analysis/), with the study's choices: the readings
at 1:16 are named relative to method.md's first defaults, and the methods table holds BAME at the
current defaults only. For the whole report of a folder: ``bame report runs/study``.
"""

from __future__ import annotations

import sys

import pandas as pd

from analysis import (
    fill_defaults,
    format_paper_table,
    format_readings_table,
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


def ablation(runs: pd.DataFrame, pattern: str = "1:16") -> pd.DataFrame:
    """Each BAME reading at ``pattern`` and SR-STE against the static control, over seeds."""
    runs = runs[(runs["status"] == "completed") & (runs["method.pattern"] == pattern)
                & runs["method.name"].isin(["static", "srste", "bame"])]
    return readings_table(run_points(runs, by=BAME_KEYS, reference=dict(zip(BAME_KEYS, FIRST_READING.values()))))


def ablation_table(runs: pd.DataFrame, pattern: str = "1:16") -> str:
    shown = format_readings_table(ablation(runs, pattern), reference_label="(the first default)")
    shown = shown.drop(columns=["pattern"]).rename(columns={"method": "run", "settings": SETTINGS_HEADER})
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


def main(root: str, figures: str | None = None) -> None:
    runs = with_new_options(load_runs(root))
    if figures:
        save_figures(runs, figures)
    print("## Readings of BAME at 1:16\n")
    print(ablation_table(runs))
    print("\n## Methods x patterns (current defaults)\n")
    print(methods_table(runs))
    print("\nFLOPs: exact ledger counts, ideal view, all phases; FLOPs = 2 x MACs.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/study", sys.argv[2] if len(sys.argv) > 2 else None)
