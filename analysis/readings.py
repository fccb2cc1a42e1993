"""The readings table: every group of runs against the control (the static mask) of its experiment.

Input is the tidy per-run table of :func:`analysis.groups.run_points`. A row is a group: its top-1 as
mean ± std over seeds and the change of that mean against the control's mean at the same pattern and
experiment (same data, model and non-method settings). :func:`analysis.forest.forest_plot` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from .groups import _method_rank, _pattern_rank
from .tables import pm

__all__ = ["METHOD_DESCRIPTIONS", "format_readings_table", "readings_table", "reading_text"]

# What a method's group is, where it changes nothing from the reference reading.
METHOD_DESCRIPTIONS = {"dense": "no mask", "static": "fixed magnitude mask", "ste": "dense backward, plain STE",
                       "srste": "dense backward", "asp": "one-shot magnitude pruning"}

READINGS_COLUMNS = ["experiment", "pattern", "method", "settings", "group", "n_readings", "n_seeds", "top1_mean",
                    "top1_std", "delta", "control_mean", "control_std", "train_flops", "is_control"]


def _groups(points: pd.DataFrame, by: Sequence[str]) -> list[dict]:
    """One dict per group of ``points`` (the rows of one experiment and pattern), in the order of
    method, then the group keys' values (ties of the later sort keep it)."""
    keys = ["method", *[k for k in by if k in points], "group"]
    rows = []
    for _, g in points.groupby(keys, dropna=False, sort=True):
        top1 = g["top1"].astype(float)
        rows.append({"experiment": g["experiment"].iloc[0], "pattern": g["pattern"].iloc[0],
                     "method": g["method"].iloc[0], "settings": g["settings"].iloc[0] or "",
                     "group": g["group"].iloc[0], "n_seeds": len(g), "top1_mean": float(top1.mean()),
                     "top1_std": float(top1.std(ddof=1)) if len(g) > 1 else math.nan,
                     "train_flops": float(g["train_flops"].astype(float).mean())})
    return rows


def readings_table(points: pd.DataFrame, control: str = "static", by: Sequence[str] | None = None) -> pd.DataFrame:
    """Each group against the ``control`` method's group of its experiment and pattern.

    Experiments (data, model, pattern and non-method settings) without a control group, or with nothing
    beside it, are left out. Within one: the control first, then the methods with one group there (in
    the tables' method order), then the groups of the methods with several readings, best mean top-1
    first (ties in the order of the group keys ``by``, default ``points.attrs['group_keys']``). Where the
    control has several groups, the one at the reference reading (empty settings) is the control.

    Columns: ``experiment``, ``pattern``, ``method``, ``settings``, ``group``, ``n_readings`` (groups
    of that method here), ``n_seeds``, ``top1_mean``, ``top1_std`` (%, ddof=1), ``delta`` (mean top-1
    minus the control's), ``control_mean``, ``control_std``, ``train_flops`` (mean), ``is_control``.
    """
    by = list(by) if by is not None else list(points.attrs.get("group_keys", []))
    rows: list[dict] = []
    cells = points.groupby(["experiment", "pattern"], sort=False).groups
    for experiment, pattern in sorted(cells, key=lambda c: (str(c[0]), _pattern_rank(c[1]))):
        groups = _groups(points.loc[cells[(experiment, pattern)]], by)
        controls = [g for g in groups if g["method"] == control]
        if not controls or len(groups) < 2:
            continue
        ref = next((g for g in controls if not g["settings"]), controls[0])
        count = pd.Series([g["method"] for g in groups]).value_counts()
        others = [g for g in groups if g is not ref]
        single = sorted((g for g in others if count[g["method"]] == 1), key=lambda g: _method_rank(g["method"]))
        several = sorted((g for g in others if count[g["method"]] > 1), key=lambda g: -g["top1_mean"])
        for g in [ref, *single, *several]:
            rows.append({**g, "n_readings": int(count[g["method"]]), "delta": g["top1_mean"] - ref["top1_mean"],
                         "control_mean": ref["top1_mean"], "control_std": ref["top1_std"],
                         "is_control": g is ref})
    table = pd.DataFrame(rows, columns=READINGS_COLUMNS)
    table.attrs.update(kind="readings_table", control=control,
                       caption=(f"Top-1 (%) as mean ± std over seeds (sample std); 'vs {control}': the change "
                                f"of the mean against the {control} control of the same experiment and pattern. "
                                f"Settings: what a group changed from the reference reading."))
    return table


def reading_text(row: pd.Series | dict, reference_label: str = "(the reference reading)") -> str:
    """What a readings-table row is: its settings, else its method's description (a control or a
    baseline), else ``reference_label`` (a method with several readings, at the reference one)."""
    if row["settings"]:
        return str(row["settings"])
    if row["n_readings"] == 1 and row["method"] in METHOD_DESCRIPTIONS:
        return METHOD_DESCRIPTIONS[row["method"]]
    return reference_label


def format_readings_table(table: pd.DataFrame, reference_label: str = "(the reference reading)") -> pd.DataFrame:
    """The readings table as display strings: method, pattern, settings, seeds, top-1 (%), vs control
    (``+0.08``); the experiment (data / model, non-method settings) first when the table spans several."""
    control = table.attrs.get("control", "static")
    out = pd.DataFrame(index=table.index)
    if table["experiment"].nunique() > 1:
        out["experiment"] = table["experiment"]
    out["method"] = table["method"]
    out["pattern"] = table["pattern"]
    out["settings"] = [reading_text(row, reference_label) for _, row in table.iterrows()]
    out["seeds"] = table["n_seeds"].astype(int).astype(str)
    out["top-1 (%)"] = [pm(m, s) for m, s in zip(table["top1_mean"], table["top1_std"])]
    out[f"vs {control}"] = [f"{d:+.2f}" for d in table["delta"]]
    out.attrs = dict(table.attrs)
    return out
