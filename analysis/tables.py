"""Comparison tables from :func:`analysis.readers.load_runs`: the paper table and a markdown writer.

Numbers are reported as mean ± std over seeds (sample std, ddof=1; one seed gives no std). Training
FLOPs are the exact counts of the run's ledger (ideal view, every phase including mask adaptation),
counted as MACs and reported as FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .groups import (
    _BASE_KEYS,
    DENSE_PATTERN,
    METHOD_ORDER,
    _hashable,
    _method_rank,
    _pattern_rank,
    comparable_keys,
    group_settings,
    prepare_groups,
    reference_reading,
)
from .readers import FLOPS_CONVENTION

__all__ = [
    "DENSE_PATTERN",
    "METHOD_ORDER",
    "comparable_keys",
    "format_paper_table",
    "mean_std_table",
    "paper_table",
    "pm",
    "to_markdown",
]

# How tables name a reference method in a ratio's header ("x SR-STE").
DISPLAY_NAMES = {"srste": "SR-STE", "ste": "STE", "asp": "ASP", "lbc": "LBC"}


def paper_table(runs: pd.DataFrame, baseline: str = "srste", dense: str = "dense",
                by: Sequence[str] | None = None, reference: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Method x pattern: top-1 mean ± std over seeds, training FLOPs, and their ratios to references.

    Only completed runs count. Rows are grouped by ``data.name``, ``model.name``, ``method``,
    ``pattern`` and, unless ``by`` gives the extra keys explicitly, by every config key that differs
    between runs of one such cell (see :func:`comparable_keys`; listed in ``attrs['group_keys']``).

    Columns: the group keys, ``settings`` (what the row's group keys change from the reference reading:
    ``reference`` where it names a key, else the key's most common value; see analysis.groups),
    ``n_seeds``, ``seeds``, ``top1_mean``, ``top1_std`` (percent, ddof=1),
    ``train_macs`` (ideal, mean over seeds), ``train_flops`` (= 2 x ``train_macs``),
    ``train_flops_executed``, ``flops_x_dense`` (this row's ideal FLOPs over the ``dense`` row of
    the same data/model/other keys; without one, the mean of the runs' ``ideal_x_dense``, their
    ledger's ratio to the dense-equivalent count of the same steps), ``flops_x_<baseline>`` (over
    the ``baseline`` row at the same pattern), ``wall_time_s`` (mean). ``attrs['caption']`` states the conventions.
    """
    runs, extra = prepare_groups(runs, by, dense)
    reading = reference_reading(runs, extra, reference, dense)
    settings = group_settings(runs, extra, reading, dense)
    runs["settings"] = settings
    keys = [k for k in _BASE_KEYS if k in runs] + ["method", "pattern"] + extra
    seed_col = "train.seed" if "train.seed" in runs else None

    rows = []
    for cell, g in runs.groupby(keys, dropna=False, sort=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        top1 = g["top1"].astype(float)
        row = dict(zip(keys, cell))
        row.update({
            "settings": g["settings"].iloc[0],
            "n_seeds": len(g),
            "seeds": tuple(sorted(g[seed_col].tolist())) if seed_col else (),
            "top1_mean": float(top1.mean()),
            "top1_std": float(top1.std(ddof=1)) if len(g) > 1 else math.nan,
            "train_macs": float(g["ideal_macs"].astype(float).mean()),
            "train_flops": 2.0 * float(g["ideal_macs"].astype(float).mean()),
            "train_flops_executed": 2.0 * float(g["executed_macs"].astype(float).mean()),
            "wall_time_s": float(g["wall_time_s"].astype(float).mean()),
            "_ledger_x_dense": float(g["ideal_x_dense"].astype(float).mean()) if "ideal_x_dense" in g
            else math.nan,
        })
        rows.append(row)
    table = pd.DataFrame(rows, columns=keys + ["settings", "n_seeds", "seeds", "top1_mean", "top1_std", "train_macs",
                                               "train_flops", "train_flops_executed", "wall_time_s",
                                               "_ledger_x_dense"])

    # references: dense of the same experiment; the baseline at the same pattern
    ref_keys = [k for k in keys if k not in ("method", "pattern") and not k.startswith("method.")]

    def ratio(ref_method: str, same_pattern: bool) -> list[float]:
        out = []
        for _, row in table.iterrows():
            mask = table["method"] == ref_method
            for k in ref_keys:
                mask &= table[k].map(_hashable).astype(str) == str(_hashable(row[k]))
            if same_pattern:
                mask &= table["pattern"] == row["pattern"]
            ref = table.loc[mask, "train_flops"]
            out.append(float(row["train_flops"] / ref.iloc[0]) if len(ref) == 1 and ref.iloc[0] > 0
                       else math.nan)
        return out

    table["flops_x_dense"] = ratio(dense, same_pattern=False)
    # no dense run of that experiment: the ledger's own dense-equivalent count (equal by construction)
    table["flops_x_dense"] = table["flops_x_dense"].fillna(table.pop("_ledger_x_dense"))
    table[f"flops_x_{baseline}"] = ratio(baseline, same_pattern=True)
    order = ["flops_x_dense", f"flops_x_{baseline}", "wall_time_s"]
    table = table[[c for c in table.columns if c not in order] + order]
    if len(table):
        rank = pd.DataFrame({
            "_p0": (table["pattern"] != DENSE_PATTERN).astype(int),
            "_p1": table["pattern"].map(_pattern_rank),
            "_m": table["method"].map(lambda m: _method_rank(m)[0]),
            "_m1": table["method"].astype(str),
        })
        for k in [k for k in _BASE_KEYS if k in table] + extra:
            rank[k] = table[k].astype(str)
        order_cols = [k for k in _BASE_KEYS if k in table] + ["_p0", "_p1", "_m", "_m1"] + extra
        table = table.loc[rank.sort_values(order_cols, kind="stable").index].reset_index(drop=True)
    table.attrs.update({
        "kind": "paper_table",
        "group_keys": extra,
        "reference": reading,
        "baseline": baseline,
        "dense": dense,
        "caption": (f"Top-1 test accuracy (%) as mean ± std over seeds (sample std, n = n_seeds); "
                    f"completed runs only. Training FLOPs: exact ledger counts over the whole run, ideal "
                    f"view (every phase incl. mask adaptation); {FLOPS_CONVENTION} 'x dense': ratio to "
                    f"the dense run of the same experiment (or, without one, to the ledger's dense-"
                    f"equivalent count); 'x {display_name(baseline)}': ratio to {baseline} at the "
                    f"same N:M pattern. Settings: what a group changed from the reference reading. Wall "
                    f"time: mean seconds per run (machine-dependent)."),
    })
    return table


# --------------------------------------------------------------------------------------------------
# formatting


def _fmt_num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def pm(mean: float, std: float, digits: int = 2) -> str:
    """Mean ± sample std (``85.76 ± 0.37``); one seed has no spread (``85.76``); ``–`` without a number."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_std_table(df: pd.DataFrame, by: str, digits: Mapping[str, int]) -> pd.DataFrame:
    """Per value of ``by`` (in order of appearance): the number of rows (``seeds``) and each column of
    ``digits`` as mean ± sample std with that many digits (:func:`pm`)."""
    agg = df.groupby(by, sort=False)[list(digits)].agg(["mean", "std"])
    table = pd.DataFrame({col: [pm(m, s, d) for m, s in zip(agg[(col, "mean")], agg[(col, "std")])]
                          for col, d in digits.items()}, index=agg.index)
    table.insert(0, "seeds", df.groupby(by, sort=False).size())
    return table


def display_name(method: str) -> str:
    """A method as a column header names it (``SR-STE``)."""
    return DISPLAY_NAMES.get(method, method)


def shown_columns(table: pd.DataFrame) -> dict[str, str]:
    """The data / model columns worth showing (when the table spans several), with their display names."""
    names = {"data.name": "data", "model.name": "model"}
    return {k: v for k, v in names.items() if k in table and table[k].nunique(dropna=False) > 1}


def format_paper_table(table: pd.DataFrame, details: bool = False) -> pd.DataFrame:
    """The paper table as display strings: method, pattern, settings (when a group has any), seeds,
    top-1 (%) as mean ± std, training FLOPs (ideal, ``1.23e+12``) and the ratios x dense and x baseline
    (``0.566``); data and model first when the table spans several. ``details`` adds the executed FLOPs
    and the wall time."""
    baseline = table.attrs.get("baseline", "srste")
    first = shown_columns(table)
    out = table[list(first)].rename(columns=first)
    out["method"] = table["method"]
    out["pattern"] = table["pattern"]
    if "settings" in table and (table["settings"].fillna("") != "").any():
        out["settings"] = table["settings"].fillna("")
    out["seeds"] = table["n_seeds"].astype(int).astype(str)
    out["top-1 (%)"] = [pm(m, s) for m, s in zip(table["top1_mean"], table["top1_std"])]
    out["training FLOPs (ideal)"] = [_fmt_num(v, ".3e") for v in table["train_flops"]]
    out["x dense"] = [_fmt_num(v, ".3f") for v in table["flops_x_dense"]]
    out[f"x {display_name(baseline)}"] = [_fmt_num(v, ".3f") for v in table[f"flops_x_{baseline}"]]
    if details:
        out["training FLOPs (executed)"] = [_fmt_num(v, ".3e") for v in table["train_flops_executed"]]
        out["wall time (s)"] = [_fmt_num(v, ".1f") for v in table["wall_time_s"]]
    out.attrs = {k: v for k, v in table.attrs.items() if k != "kind"}  # formatted: not to be formatted again
    return out


def _cell(v: Any, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        text = _fmt_num(float(v), floatfmt)
    elif v is None:
        text = ""
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g", index: bool = False,
                caption: bool = True, pad: bool = True) -> str:
    """A GitHub-flavoured markdown table (no ``tabulate`` needed).

    A paper table (``attrs['kind'] == 'paper_table'``) is first formatted by
    :func:`format_paper_table`; its ``attrs['caption']`` follows the table when ``caption``.
    Numeric columns are right-aligned; floats use ``floatfmt``; ``|`` in cells is escaped. ``pad``:
    columns padded to one width (readable as text); without, ``| --- | ---: |`` rows as written by hand.
    """
    if df.attrs.get("kind") == "paper_table":
        df = format_paper_table(df)
    if index:
        df = df.reset_index()
    headers = [str(c) for c in df.columns]
    body = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    # a formatted numeric column ('71.2 ± 0.3', '0.42x') is right-aligned too
    for j in range(len(headers)):
        if not numeric[j] and len(df) and all(_looks_numeric(r[j]) for r in body):
            numeric[j] = True
    widths = [max([len(h)] + [len(r[j]) for r in body] + [3]) if pad else 0 for j, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":" if pad else "---:") if num else ("-" * w if pad else "---")
                            for w, num in zip(widths, numeric)) + " |"
    lines = [line(headers), sep] + [line(r) for r in body]
    text = "\n".join(lines) + "\n"
    if caption and df.attrs.get("caption"):
        text += f"\n{df.attrs['caption']}\n"
    return text


def _looks_numeric(text: str) -> bool:
    t = text.replace("±", " ").replace("x", " ").replace("–", "").split()
    if not t:
        return True
    try:
        [float(x) for x in t]
    except ValueError:
        return False
    return True
