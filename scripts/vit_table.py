"""Print the small-ViT table of docs/results.md (section 4): dense, static, srste and bame on Fashion-MNIST with
AdamW at 2:4 and 1:16, and the SGD rows (dense, srste), from the run folders (any number, read together).

    .venv/bin/python scripts/vit_table.py runs/vit runs/vit_sgd
    .venv/bin/python scripts/vit_table.py results/fmnist_vit/vit results/fmnist_vit/vit_sgd   # the bundle

Rows are method x pattern x optimizer (the SGD rows also change the learning rate, momentum and weight
decay: see configs/fmnist_vit.yaml); FLOPs x dense and x SR-STE are relative to the run of the same
optimizer. ``vs dense`` is the row's mean top-1 minus the dense row's of the same optimizer: how much the
N:M method loses under that optimizer (SR-STE is reported to lose more under Adam than under SGD).
"""

from __future__ import annotations

import sys

import pandas as pd

from analysis import format_paper_table, load_masks, load_runs, mean_std_table, paper_table, to_markdown

MODEL = "vit_patch4"
OPTIMIZER = "train.optimizer"


def vit_runs(folders: list[str]) -> pd.DataFrame:
    """The completed runs of the small ViT in ``folders``; two runs of one row and seed are an error."""
    runs = pd.concat([load_runs(f) for f in folders], ignore_index=True)
    runs = runs[(runs["status"] == "completed") & (runs["model.name"] == MODEL)]
    twice = runs.duplicated(["method.name", "method.pattern", OPTIMIZER, "train.seed"], keep=False)
    if twice.any():
        raise SystemExit("two runs of one row and seed: " + ", ".join(runs.loc[twice, "path"].astype(str)))
    return runs


def vit_table(runs: pd.DataFrame) -> str:
    table = paper_table(runs, by=[OPTIMIZER], reference={OPTIMIZER: "adamw"})
    dense = table[table["method"] == "dense"].set_index(OPTIMIZER)["top1_mean"]
    gap = table["top1_mean"] - table[OPTIMIZER].map(dense)
    shown = format_paper_table(table)
    shown = shown.drop(columns=["settings"], errors="ignore")  # the optimizer column says it
    shown.insert(shown.columns.get_loc("pattern") + 1, "optimizer", table[OPTIMIZER])
    shown.insert(shown.columns.get_loc("top-1 (%)") + 1, "vs dense",
                 [("–" if m == "dense" or pd.isna(g) else f"{g:+.2f}") for m, g in zip(table["method"], gap)])
    return to_markdown(shown, caption=False, pad=False).rstrip("\n")


def flips_table(runs: pd.DataFrame) -> str:
    """SR-STE's mask flips over the whole run (masks.csv), per pattern and optimizer, mean ± std over seeds:
    the mask churn STEP (ICML 2023) blames for SR-STE's trouble under Adam."""
    srste = runs[runs["method.name"] == "srste"]
    per_run = pd.DataFrame({
        "row": [f"{p}, {o}" for p, o in zip(srste["method.pattern"], srste[OPTIMIZER])],
        "mask flips (millions)": [load_masks(run)["flips"].sum() / 1e6 for _, run in srste.iterrows()]})
    table = mean_std_table(per_run.sort_values("row"), "row", {"mask flips (millions)": 3})
    return to_markdown(table.reset_index().rename(columns={"row": "SR-STE: pattern, optimizer"}),
                       caption=False, pad=False).rstrip("\n")


def main(folders: list[str]) -> None:
    runs = vit_runs(folders)
    print(vit_table(runs))
    print("\nTop-1: final test accuracy (all 10k test images), mean ± std over seeds. FLOPs: exact ledger "
          "counts, ideal view, all phases; FLOPs = 2 x MACs; x dense and x SR-STE: against the run of the "
          "same optimizer (x SR-STE at the same pattern).\n")
    print(flips_table(runs))


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/vit", "runs/vit_sgd"])
