"""Ablations of BAME's readings: each varies a few config keys against a reference (the base config) and the
static mask as the control (no adaptation); top-1 as mean ± std over seeds, training FLOPs (ideal, 2 x MACs).

An ablation's runs come in three parts, each a :func:`analysis.load_runs` table: ``reference``, ``variant``
(the runs of its variants) and ``control``. A variant is written as overrides, ``"method.bame.tau=0.3"``. A
study that was not swept as ablations yields them too (:func:`study_ablation_runs`): the runs of one family that
differ in a few keys, the group at the current defaults of those keys being the reference. A variant that
equals its reference is refused: an ablation compares the default with alternatives, never with itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .groups import matching
from .style import empty, legend_inside_or_below, method_color, new_figure, style
from .tables import paper_table, pm

__all__ = ["CONTROL", "ablation_keys", "ablation_runs", "study_ablation_runs", "ablation_table",
           "format_ablation_table", "ablation_figure", "ablation_deltas", "ablations_figure"]

CONTROL = "static (control)"
REFERENCE = " (reference)"


def ablation_keys(variants: Sequence[str]) -> list[str]:
    """The config keys the variants set (each variant one or more ``key=value`` separated by spaces)."""
    return sorted({o.split("=")[0] for v in variants for o in v.split()})


def _setting(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys)


def ablation_runs(parts: Mapping[str, pd.DataFrame], keys: Sequence[str]) -> pd.DataFrame:
    """The completed runs of ``parts`` (``reference``, ``variant``, ``control``) with a ``role`` and a
    ``setting``: ``tau=0.3``, ``tau=0.5 (reference)`` or ``static (control)``."""
    runs = pd.concat([df.assign(role=role) for role, df in parts.items()], ignore_index=True)
    runs = runs[runs["status"] == "completed"].copy()
    runs["setting"] = [CONTROL if role == "control" else _setting(row, keys) + (REFERENCE if role == "reference" else "")
                       for role, (_, row) in zip(runs["role"], runs.iterrows())]
    reference = {s.removesuffix(REFERENCE) for s in runs.loc[runs["role"] == "reference", "setting"]}
    same = sorted(set(runs.loc[runs["role"] == "variant", "setting"]) & reference)
    if same:
        raise ValueError(f"the variant {same[0]} is the reference itself: an ablation compares the current default "
                         f"with alternatives (was the default changed to it? then vary the old value instead)")
    return runs


def study_ablation_runs(runs: pd.DataFrame, family: Mapping[str, Any], keys: Sequence[str],
                        defaults: Mapping[str, Any], control: str = "static") -> pd.DataFrame:
    """An ablation read from a study's runs (:func:`ablation_runs`' table): the completed runs of ``family``
    (config values they share, see :func:`analysis.matching`) differing in ``keys``; the reference is the group
    at ``defaults`` of ``keys`` (the current defaults), the variants are the others, the control is every run
    of method ``control``. Raises LookupError without a run at the defaults or without a variant (the study
    lacks them), ValueError where a variant equals the reference."""
    done = runs[runs["status"] == "completed"]
    members = matching(done, family)
    reference = matching(members, {k: defaults[k] for k in keys})
    variants = members.drop(reference.index)
    if reference.empty or variants.empty:
        what = "at the defaults" if reference.empty else "besides the one at the defaults"
        raise LookupError(f"no run of the family {dict(family)} {what} of {', '.join(keys)} "
                         f"({', '.join(f'{k}={defaults[k]}' for k in keys)}): nothing to compare")
    return ablation_runs({"reference": reference, "variant": variants,
                          "control": done[done["method.name"] == control]}, keys)


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`analysis.paper_table` of :func:`ablation_runs`, one row per setting."""
    return paper_table(runs, by=["setting"])


def format_ablation_table(table: pd.DataFrame) -> pd.DataFrame:
    """Setting, seeds, top-1 (%) as mean ± std, training FLOPs and their ratio to the static control."""
    static_flops = table.loc[table["method"] == "static", "train_flops"]
    static_flops = static_flops.iloc[0] if len(static_flops) else np.nan
    return pd.DataFrame({
        "setting": table["setting"],
        "seeds": table["n_seeds"],
        "top-1 (%)": [pm(m, s) for m, s in zip(table["top1_mean"], table["top1_std"])],
        "training FLOPs": table["train_flops"],
        "x static": table["train_flops"] / static_flops,
    })


def ablation_figure(table: pd.DataFrame, runs: pd.DataFrame, title: str) -> Figure:
    """Final top-1 of each BAME setting (mean ± std over seeds, single seeds as dots) against the static
    control (dashed, its ±1 std shaded)."""
    bame = table[table["method"] == "bame"].reset_index(drop=True)
    control = table[table["method"] == "static"]
    with style():
        fig, ax = new_figure(6.4, 3.6)
        if bame.empty:
            empty(ax, "no BAME runs")
            return fig
        x = np.arange(len(bame))
        color = method_color("bame")
        ax.errorbar(x, bame["top1_mean"], yerr=bame["top1_std"].fillna(0), fmt="o", capsize=4, color=color,
                    label="BAME")
        settings = list(bame["setting"])
        for _, run in runs[runs["method.name"] == "bame"].iterrows():  # single seeds
            ax.plot(settings.index(run["setting"]), run["top1"], ".", color=color, alpha=0.35)
        if len(control):
            c = control.iloc[0]
            ax.axhline(c["top1_mean"], color="0.3", ls="--", label=CONTROL)
            if c["n_seeds"] > 1:
                ax.axhspan(c["top1_mean"] - c["top1_std"], c["top1_mean"] + c["top1_std"], color="0.3", alpha=0.12,
                           lw=0)
        ax.set_xticks(x)
        ax.set_xticklabels(settings, rotation=15, ha="right")
        ax.set_xlim(-0.6, len(bame) - 0.4)
        ax.set_ylabel("final test top-1 (%)")
        ax.set_title(title, loc="left")
        legend_inside_or_below(ax)
    return fig


def ablation_deltas(tables: Mapping[str, pd.DataFrame], titles: Mapping[str, str]) -> pd.DataFrame:
    """Per ablation (``tables``: its :func:`ablation_table`) and variant, the change of mean top-1 against the
    reference (points) and of its training FLOPs (%)."""
    rows = []
    for name, table in tables.items():
        is_ref = table["setting"].str.endswith(REFERENCE)
        ref = table[is_ref].iloc[0]
        for _, r in table[(table["method"] == "bame") & ~is_ref].iterrows():
            rows.append({"ablation": titles.get(name, name), "variant": r["setting"],
                         "delta top-1 vs reference": r["top1_mean"] - ref["top1_mean"],
                         "delta FLOPs vs reference (%)": 100 * (r["train_flops"] / ref["train_flops"] - 1)})
    return pd.DataFrame(rows, columns=["ablation", "variant", "delta top-1 vs reference",
                                       "delta FLOPs vs reference (%)"])


def ablations_figure(deltas: pd.DataFrame) -> Figure:
    """Every variant's change of mean top-1 against its reference, one bar each (:func:`ablation_deltas`)."""
    with style():
        fig, ax = new_figure(6.4, 0.3 * len(deltas) + 1.4)
        if deltas.empty:
            empty(ax, "no ablation variants")
            return fig
        ax.barh([f"{a}: {v}" for a, v in zip(deltas["ablation"], deltas["variant"])],
                deltas["delta top-1 vs reference"], color=method_color("bame"))
        ax.axvline(0, color="0.3", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("mean top-1 minus the reference's (points)")
        ax.set_title("Ablations against the reference", loc="left")
    return fig
