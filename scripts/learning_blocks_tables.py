"""The tables and the figure of docs/results.md section 5 (BAME whose blocks learn), from the study's runs.

    .venv/bin/python scripts/learning_blocks_tables.py runs/learn3 runs/learn10 runs/learn_equal docs/figures

Each folder is one study length (3 epochs, 10 epochs, and the runs trained longer to SR-STE's 10-epoch
training FLOPs); a missing folder is skipped. Prints, per length and pattern, every group's final top-1
(mean ± std over seeds), its difference to the static mask, and its training FLOPs as a fraction of
SR-STE's; then the equal-FLOPs table; and writes one Pareto figure per pattern (PNG + PDF) of the 10-epoch
groups and the equal-FLOPs runs: final top-1 against total training FLOPs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis import load_runs, pareto_scatter, to_markdown
from analysis.layout import text_problems
from analysis.style import save as save_figure

OBF_DEFAULT = {"tau": 0.5}  # the study's OBF variants change tau (and beta); the default reading keeps it
FAMILIES = {"phased": "phased, its switch fractions",
            "progressive magnitude": "learning blocks, progressive, magnitude, T 1, its t_f"}


def reading(row: pd.Series) -> tuple[str, str | None]:
    """A run's short label and family (runs of one family differ only in their budget)."""
    method = row["method.name"]
    if method == "srste":
        return "SR-STE", None
    if method == "phased":
        return f"phased, switch {row['method.phased.switch_fraction']:g}", "phased"
    if method != "bame":
        return str(method), None
    if row.get("method.bame.designated_grad", "adaptation") != "window":
        return "BAME, first family (default)", None
    designation, rule = row["method.bame.designation"], row["method.bame.regrow_rule"]
    interval, tau = int(row["method.bame.interval_steps"]), float(row["method.bame.tau"])
    obf = "" if tau == OBF_DEFAULT["tau"] else f", OBF tau {tau:g} beta {float(row['method.bame.beta']):g}"
    if designation == "progressive":
        label = f"learning blocks, progressive, {rule}, T {interval}, t_f {row['method.bame.t_f_fraction']:g}{obf}"
        family = "progressive magnitude" if rule == "magnitude" and interval == 1 and not obf else None
        return label, family
    return f"learning blocks, top-k, {rule}, T {interval}, rho {row['method.bame.rho']:g}{obf}", None


def points(root: Path) -> pd.DataFrame:
    """One row per completed run of ``root``: label, family, pattern, seed, epochs, top-1 and FLOPs."""
    runs = load_runs(root)
    runs = runs[runs["status"].isin(["completed", "diverged"])]
    rows = []
    for _, r in runs.iterrows():
        label, family = reading(r)
        epochs = float(r["train.epochs"])
        rows.append({"group": label, "family": family, "method": r["method.name"], "pattern": r["method.pattern"],
                     "seed": int(r["train.seed"]), "epochs": epochs, "status": r["status"],
                     "top1": float(r["top1"]) if r["status"] == "completed" else float("nan"),
                     "train_flops": float(r["ideal_flops"]) if r["status"] == "completed" else float("nan")})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (pattern, group, epochs): n, top-1 mean and std, FLOPs mean."""
    g = df.groupby(["pattern", "group", "epochs"], sort=False)
    out = g.agg(n=("top1", "count"), top1=("top1", "mean"), top1_std=("top1", "std"),
                flops=("train_flops", "mean"), family=("family", "first"), method=("method", "first")).reset_index()
    return out


def length_table(df: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """Every group of one study length at ``pattern``, by training FLOPs, against static and SR-STE."""
    s = summary(df[df["pattern"] == pattern])
    static = s.loc[s["group"] == "static", "top1"]
    srste = s.loc[s["group"] == "SR-STE", "flops"]
    s = s.sort_values("flops")
    return pd.DataFrame({
        "run": s["group"],
        "top-1 (%)": [f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f}" for m, sd, n in zip(s["top1"], s["top1_std"], s["n"])],
        "seeds": s["n"],
        "vs static": [f"{m - static.iloc[0]:+.2f}" if len(static) else "–" for m in s["top1"]],
        "FLOPs x SR-STE": [f"{f / srste.iloc[0]:.3f}" if len(srste) else "–" for f in s["flops"]],
    })


def equal_table(equal: pd.DataFrame, ten: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """The groups trained longer, at SR-STE's 10-epoch FLOPs, beside the same groups at 10 epochs."""
    long, short = summary(equal[equal["pattern"] == pattern]), summary(ten[ten["pattern"] == pattern])
    srste = short.loc[short["group"] == "SR-STE"]
    rows = []
    if len(srste):
        r = srste.iloc[0]
        rows.append({"run": "SR-STE", "epochs": f"{r['epochs']:g}", "top-1 at equal FLOPs": f"{r['top1']:.2f} ± {r['top1_std']:.2f}",
                     "FLOPs x SR-STE": "1.000", "top-1 at 10 epochs": f"{r['top1']:.2f} ± {r['top1_std']:.2f}"})
    for _, r in long.sort_values("flops").iterrows():
        at10 = short.loc[short["group"] == r["group"]]
        rows.append({"run": r["group"], "epochs": f"{r['epochs']:g}",
                     "top-1 at equal FLOPs": f"{r['top1']:.2f} ± {r['top1_std']:.2f}",
                     "FLOPs x SR-STE": f"{r['flops'] / srste['flops'].iloc[0]:.3f}" if len(srste) else "–",
                     "top-1 at 10 epochs": (f"{at10['top1'].iloc[0]:.2f} ± {at10['top1_std'].iloc[0]:.2f}"
                                            if len(at10) else "–")})
    return pd.DataFrame(rows)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    roots, figures = [Path(a) for a in argv[:3]], Path(argv[3])
    tables = {root: points(root) if root.is_dir() else pd.DataFrame() for root in roots}
    three, ten, equal = (tables[r] for r in roots)
    for name, df in (("3 epochs", three), ("10 epochs", ten)):
        for pattern in sorted(df["pattern"].unique(), key=lambda p: -int(p.split(":")[1])) if len(df) else []:
            print(f"\n### {name}, {pattern}\n")
            print(to_markdown(length_table(df, pattern), caption=False, pad=False).rstrip("\n"))
            lost = df[(df["pattern"] == pattern) & (df["status"] != "completed")]
            for _, r in lost.iterrows():
                print(f"\n{r['group']}, seed {r['seed']}: {r['status']} (not in the mean)")
    if len(equal) and len(ten):
        for pattern in sorted(equal["pattern"].unique(), key=lambda p: -int(p.split(":")[1])):
            print(f"\n### equal training FLOPs (SR-STE's 10 epochs), {pattern}\n")
            print(to_markdown(equal_table(equal, ten, pattern), caption=False, pad=False).rstrip("\n"))
    if len(ten):
        figures.mkdir(parents=True, exist_ok=True)
        longer = equal.assign(group=equal["group"] + ", longer", family=None)  # not on its family's line
        both = pd.concat([ten, longer] if len(equal) else [ten])
        both["family"] = both["family"].map(lambda f: FAMILIES.get(f) if isinstance(f, str) else None)
        for pattern in sorted(both["pattern"].unique()):
            sub = both[both["pattern"] == pattern]
            fig = pareto_scatter(sub, title=f"{pattern}: 10 epochs, and longer", legend="groups")
            problems = text_problems(fig)
            if problems:
                raise SystemExit(f"the {pattern} figure's texts overlap: {problems}")
            path = figures / f"learning_blocks_pareto_{pattern.replace(':', 'of')}"
            save_figure(fig, path)
            print(f"\nwrote {path}.png and .pdf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
