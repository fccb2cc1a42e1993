"""Comparison tables from :func:`analysis.readers.load_runs`: the paper table and a markdown writer.

Numbers are reported as mean ± std over seeds (sample std, ddof=1; one seed gives no std). Training
FLOPs are the exact counts of the run's ledger (ideal view, every phase including mask adaptation),
counted as MACs and reported as FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .readers import FLOPS_CONVENTION

__all__ = [
    "DENSE_PATTERN",
    "METHOD_ORDER",
    "comparable_keys",
    "format_paper_table",
    "paper_table",
    "to_markdown",
]

# The order methods appear in tables and legends; unknown methods follow alphabetically.
METHOD_ORDER = ("dense", "static", "ste", "srste", "asp", "lbc", "bimask", "bame")
DENSE_PATTERN = "dense"  # the pattern column of a dense row (its config pattern is not used)

# Config keys that never change the numbers a run produces: not grouped on, not checked.
_IGNORED_KEYS = ("name", "train.seed", "train.device", "train.progress", "data.root", "data.num_workers",
                 "train.eval_batch_size", "train.log_every_steps", "train.checkpoint_every_steps")
_IGNORED_PREFIXES = ("instrument.",)
_CONFIG_PREFIXES = ("data.", "model.", "method.", "train.")
_BASE_KEYS = ("data.name", "model.name")


def _method_rank(name: Any) -> tuple[int, str]:
    name = str(name)
    return (METHOD_ORDER.index(name), name) if name in METHOD_ORDER else (len(METHOD_ORDER), name)


def _pattern_rank(p: Any) -> float:
    """Sort N:M patterns by density (2:4 before 1:4 before 1:16); unparsable ones last."""
    try:
        n, m = str(p).split(":")
        return -int(n) / int(m)
    except ValueError:
        return math.inf


def _config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns
            if c.startswith(_CONFIG_PREFIXES) and c not in _IGNORED_KEYS
            and not c.startswith(_IGNORED_PREFIXES) and c not in ("method.name", "method.pattern")]


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def comparable_keys(runs: pd.DataFrame, dense: str = "dense") -> list[str]:
    """Config keys that differ between runs of one (data, model, method, pattern) cell.

    Runs differing in such a key are not seeds of one experiment, so :func:`paper_table` keeps them
    apart. A key is compared only between the runs it applies to (:func:`_applies`). A key that some
    older run folders lack (added to the config later) splits nothing unless two real values differ.
    """
    keys = []
    cell = [k for k in ("data.name", "model.name", "method.name", "method.pattern") if k in runs]
    for col in _config_columns(runs):
        if col in _BASE_KEYS:
            continue
        sub = runs[_applies(runs, col, dense)]
        if sub.empty:
            continue
        values = sub[col].map(_hashable)
        n = values.groupby([sub[k].map(_hashable).astype(str) for k in cell]).nunique(dropna=True)
        if (n > 1).any():
            keys.append(col)
    return keys


def _applies(runs: pd.DataFrame, col: str, dense: str) -> pd.Series:
    """Which runs a config key matters to: ``method.<name>.*`` only to method ``<name>``, other
    ``method.*`` keys to every method but dense, the rest to every run."""
    names = runs["method.name"].astype(str)
    parts = col.split(".")
    if len(parts) > 2 and parts[0] == "method":
        return names == parts[1]
    if parts[0] == "method":
        return names != dense
    return pd.Series(True, index=runs.index)


def paper_table(runs: pd.DataFrame, baseline: str = "srste", dense: str = "dense",
                by: Sequence[str] | None = None) -> pd.DataFrame:
    """Method x pattern: top-1 mean ± std over seeds, training FLOPs, and their ratios to references.

    Only completed runs count. Rows are grouped by ``data.name``, ``model.name``, ``method``,
    ``pattern`` and, unless ``by`` gives the extra keys explicitly, by every config key that differs
    between runs of one such cell (see :func:`comparable_keys`; listed in ``attrs['group_keys']``).

    Columns: the group keys, ``n_seeds``, ``seeds``, ``top1_mean``, ``top1_std`` (percent, ddof=1),
    ``train_macs`` (ideal, mean over seeds), ``train_flops`` (= 2 x ``train_macs``),
    ``train_flops_executed``, ``flops_x_dense`` (this row's ideal FLOPs over the ``dense`` row of
    the same data/model/other keys; without one, the mean of the runs' ``ideal_x_dense``, their
    ledger's ratio to the dense-equivalent count of the same steps), ``flops_x_<baseline>`` (over
    the ``baseline`` row at the same pattern), ``wall_time_s`` (mean). ``attrs['caption']`` states the conventions.
    """
    if "status" in runs:
        runs = runs[runs["status"] == "completed"]
    runs = runs.copy()
    extra = list(by) if by is not None else comparable_keys(runs, dense=dense)
    runs["method"] = runs["method.name"].astype(str)
    runs["pattern"] = np.where(runs["method"] == dense, DENSE_PATTERN, runs["method.pattern"].astype(str))
    for col in extra:
        runs[col] = runs[col].map(_hashable).astype(object)
        # a run a key does not apply to (dense and method options, static and BAME's options)
        # must not be split or labelled by it
        runs.loc[~_applies(runs, col, dense), col] = None
    keys = [k for k in _BASE_KEYS if k in runs] + ["method", "pattern"] + extra
    seed_col = "train.seed" if "train.seed" in runs else None

    rows = []
    for cell, g in runs.groupby(keys, dropna=False, sort=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        top1 = g["top1"].astype(float)
        row = dict(zip(keys, cell))
        row.update({
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
    table = pd.DataFrame(rows, columns=keys + ["n_seeds", "seeds", "top1_mean", "top1_std", "train_macs",
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
        "baseline": baseline,
        "dense": dense,
        "caption": (f"Top-1 test accuracy (%) as mean ± std over seeds (sample std, n = n_seeds); "
                    f"completed runs only. Training FLOPs: exact ledger counts over the whole run, ideal "
                    f"view (every phase incl. mask adaptation); {FLOPS_CONVENTION} 'x dense': ratio to "
                    f"the dense run of the same experiment (or, without one, to the ledger's dense-"
                    f"equivalent count); 'x {baseline}': ratio to {baseline} at the "
                    f"same N:M pattern. Wall time: mean seconds per run (machine-dependent)."),
    })
    return table


# --------------------------------------------------------------------------------------------------
# formatting


def _fmt_num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def format_paper_table(table: pd.DataFrame) -> pd.DataFrame:
    """The paper table as display strings (``71.23 ± 0.15``, ``1.23e+12``, ``0.42x``)."""
    baseline = table.attrs.get("baseline", "srste")
    keep = [k for k in table.columns if k in _BASE_KEYS or k in ("method", "pattern")]
    keep += list(table.attrs.get("group_keys", []))
    out = table[keep].copy()
    out = out.rename(columns={"data.name": "data", "model.name": "model"})
    out["seeds"] = table["n_seeds"].astype(int).astype(str)
    out["top-1 (%)"] = [
        f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}" if not math.isnan(m) else "–"
        for m, s in zip(table["top1_mean"], table["top1_std"])]
    out["train FLOPs (ideal)"] = [_fmt_num(v, ".3e") for v in table["train_flops"]]
    out["x dense"] = [_fmt_num(v, ".3f") + ("x" if not math.isnan(v) else "") for v in table["flops_x_dense"]]
    col = f"flops_x_{baseline}"
    out[f"x {baseline}"] = [_fmt_num(v, ".3f") + ("x" if not math.isnan(v) else "") for v in table[col]]
    out["train FLOPs (executed)"] = [_fmt_num(v, ".3e") for v in table["train_flops_executed"]]
    out["wall time (s)"] = [_fmt_num(v, ".1f") for v in table["wall_time_s"]]
    out.attrs = dict(table.attrs)
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
                caption: bool = True) -> str:
    """A GitHub-flavoured markdown table (no ``tabulate`` needed).

    A paper table (``attrs['kind'] == 'paper_table'``) is first formatted by
    :func:`format_paper_table`; its ``attrs['caption']`` follows the table when ``caption``.
    Numeric columns are right-aligned; floats use ``floatfmt``; ``|`` in cells is escaped.
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
    widths = [max([len(h)] + [len(r[j]) for r in body] + [3]) for j, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
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
