"""Print the methods table of docs/results.md ("Predecessors"): static, srste, bame, bimask and lbc at 1:16 and
2:4, and the transposable variants, from the study's run folders (any number of them, read together).

    .venv/bin/python scripts/methods_table.py runs/methods13 runs/learn3

A run is a row's seed when its resolved config is the study config's (configs/study/fmnist_lenet_wide.yaml)
but for the method, the pattern and the seed: other readings in the same folders (BAME's ablations) are left
out. The transposable variant (``method.mask_structure: transposable``) may also change BAME's block shape,
which it needs to tile; both keys show in the row's settings. The table is ``bame report``'s paper table
(analysis.paper_table), FLOPs ideal, relative to SR-STE at the same pattern.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis import fill_defaults, format_paper_table, load_runs, paper_table, to_markdown
from analysis.readers import flatten

ROOT = Path(__file__).resolve().parent.parent
STUDY_CONFIG = ROOT / "configs/study/fmnist_lenet_wide.yaml"
METHODS = ("static", "srste", "bame", "bimask", "lbc")
PATTERNS = ("1:16", "2:4")
NAMING = ("method.name", "method.pattern", "train.seed")  # what the rows and seeds differ in
STRUCTURE = "method.mask_structure"
TRANSPOSABLE_KEYS = (STRUCTURE, "method.bame.block_rows")  # what the transposable variant may change
# Config keys that do not change a run's numbers (analysis.groups ignores them too).
IGNORED = ("name", "train.device", "train.progress", "data.root", "data.num_workers", "train.eval_batch_size",
           "train.log_every_steps", "train.checkpoint_every_steps")


def study_reference() -> dict:
    """The study config, resolved with the current defaults, as dotted keys."""
    from bame.config import load_config, to_dict

    reference = flatten(to_dict(load_config(STUDY_CONFIG)))
    reference.setdefault(STRUCTURE, "row")  # before mask_structure existed every mask was row N:M
    return {k: v for k, v in reference.items()
            if k not in NAMING and k not in IGNORED and not k.startswith("instrument.")}


def _matches(run: pd.Series, reference: dict) -> bool:
    """The run is the study config but for naming keys (and the transposable variant's own keys)."""
    method = run["method.name"]
    transposable = run[STRUCTURE] == "transposable"
    for key, value in reference.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "method" and parts[1] != method:
            continue  # another method's options
        if transposable and key in TRANSPOSABLE_KEYS:
            continue
        if run[key] != value:
            return False
    return True


def study_runs(folders: list[str]) -> pd.DataFrame:
    """The completed runs of the table's methods and patterns in ``folders`` that ran the study config."""
    return select(pd.concat([load_runs(f) for f in folders], ignore_index=True), study_reference())


def select(runs: pd.DataFrame, reference: dict) -> pd.DataFrame:
    """The completed runs (rows of :func:`analysis.load_runs`) of the table's methods and patterns whose
    config is ``reference`` but for the naming keys; two runs of one row and seed are an error."""
    runs = fill_defaults(runs, reference)  # folders from before an option existed ran its default
    runs = runs[(runs["status"] == "completed") & runs["method.name"].isin(METHODS)
                & runs["method.pattern"].astype(str).isin(PATTERNS)]
    runs = runs[runs.apply(_matches, axis=1, reference=reference)]
    twice = runs.duplicated(["method.name", "method.pattern", STRUCTURE, "train.seed"], keep=False)
    if twice.any():
        raise SystemExit("two runs of one row and seed: " + ", ".join(runs.loc[twice, "path"].astype(str)))
    return runs


def methods_table(runs: pd.DataFrame) -> str:
    table = paper_table(runs, by=list(TRANSPOSABLE_KEYS), reference={STRUCTURE: "row", "method.bame.block_rows": 1})
    shown = format_paper_table(table).drop(columns=["x dense"])
    return to_markdown(shown, caption=False, pad=False).rstrip("\n")


def main(folders: list[str]) -> None:
    print(methods_table(study_runs(folders)))
    print("\nTop-1: final test accuracy, mean ± std over seeds. FLOPs: exact ledger counts, ideal view, all "
          "phases; FLOPs = 2 x MACs; x SR-STE at the same pattern.")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/methods13"])
