"""Print the tables of docs/results.md from the study's run folders, and save its figures.

    .venv/bin/python scripts/results_tables.py runs/study [docs/figures]
"""

from __future__ import annotations

import sys

import pandas as pd

from analysis import load_runs, paper_table

# The reading the ablation table's rows are relative to (method.md's first defaults), and its columns.
FIRST_READING = {"lma": "taylor", "rho": 0.05, "interval_steps": 100, "regrow": "stored", "obf": True,
                 "obf_bias_correction": False, "tau": 0.5, "min_changes": 2, "selection": "freeze_then_topk",
                 "t_f_fraction": 0.5, "block_rows": 1, "score_steps": 1}
BAME_KEYS = list(FIRST_READING)


def _pm(mean: float, std: float) -> str:
    """Mean ± sample std; a single seed has no spread to show."""
    return f"{mean:.2f}" if std != std else f"{mean:.2f} ± {std:.2f}"  # std != std: NaN (one seed)


def ablation_table(runs: pd.DataFrame, pattern: str = "1:16") -> str:
    """Each BAME reading at ``pattern`` against the static control, over seeds."""
    runs = runs[(runs["status"] == "completed") & (runs["method.pattern"] == pattern)]
    static = runs[runs["method.name"] == "static"]["top1"]
    lines = ["| run | settings (changed from lma=taylor, rho=0.05, T=100, t_f=0.5) | seeds | top-1 (%) | vs static |",
             "| --- | --- | ---: | ---: | ---: |"]

    def row(name: str, settings: str, top1: pd.Series) -> None:
        delta = top1.mean() - static.mean()
        lines.append(f"| {name} | {settings} | {len(top1)} | {_pm(top1.mean(), top1.std())} | {delta:+.2f} |")

    row("static", "fixed magnitude mask", static)
    row("srste", "dense backward", runs[runs["method.name"] == "srste"]["top1"])
    bame = runs[runs["method.name"] == "bame"]
    groups = bame.groupby([f"method.bame.{k}" for k in BAME_KEYS], dropna=False)
    for values, g in sorted(groups, key=lambda kv: -kv[1]["top1"].mean()):
        changed = [f"{k}={v}" for k, v in zip(BAME_KEYS, values) if v != FIRST_READING[k]]
        row("bame", ", ".join(changed) or "(the first default)", g["top1"])
    return "\n".join(lines)


def current_defaults(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed runs of every method, BAME only with the current defaults of its readings."""
    from bame.config import BameConfig

    default = BameConfig()
    is_default = pd.Series(True, index=runs.index)
    for k in BAME_KEYS:
        is_default &= runs[f"method.bame.{k}"].map(lambda v, k=k: v == getattr(default, k))
    return runs[(runs["status"] == "completed") & ((runs["method.name"] != "bame") | is_default)]


def methods_table(runs: pd.DataFrame) -> str:
    """Method x pattern with the current defaults: top-1, training FLOPs vs dense and vs SR-STE."""
    table = paper_table(current_defaults(runs), by=[])
    lines = ["| method | pattern | seeds | top-1 (%) | training FLOPs (ideal) | x dense | x SR-STE |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in table.iterrows():
        srste = "–" if pd.isna(r["flops_x_srste"]) else f"{r['flops_x_srste']:.3f}"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['n_seeds']} | {_pm(r['top1_mean'], r['top1_std'])} | "
                     f"{r['train_flops']:.3e} | {r['flops_x_dense']:.3f} | {srste} |")
    return "\n".join(lines)


def save_figures(runs: pd.DataFrame, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from analysis.figures import accuracy_vs_flops, phase_breakdown, save

    methods = current_defaults(runs)
    save(accuracy_vs_flops(methods, logx=True), f"{out}/study_accuracy_vs_flops", formats=("png",))
    save(phase_breakdown(methods), f"{out}/study_phase_breakdown", formats=("png",))
    ablation = runs[(runs["status"] == "completed") & (runs["method.pattern"] == "1:16")
                    & runs["method.name"].isin(["bame", "static"])]
    save(accuracy_vs_flops(ablation), f"{out}/study_ablation_1of16", formats=("png",))


def with_new_options(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs from before a BAME option existed lack its column: they ran what its default does (a new
    option's default keeps the old behaviour), so fill it in."""
    from bame.config import BameConfig

    runs = runs.copy()
    for k in BAME_KEYS:
        col, default = f"method.bame.{k}", getattr(BameConfig(), k)
        runs[col] = runs[col].astype(object).where(runs[col].notna(), default) if col in runs else default
        if type(default) is int:  # a column with gaps was read as floats: 10.0 -> 10
            runs[col] = runs[col].map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
    return runs


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
