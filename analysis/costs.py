"""Training FLOPs as tables: per phase of finished runs (flops.csv), and per step of a config before training
(the reports of ``bame flops``), with the checks of those counts against docs/method.md's closed forms.

Counts are MACs; FLOPs = 2 x MACs. A ``bame flops`` report is the dict ``bame flops --json`` prints
(``bame.flops_report.flops_report``): plain data, read here without bame's training code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bame.contract import DENSE_PATTERN, FLOPS_PER_MAC, LAYER_PHASES

from .groups import _method_rank
from .phases import PHASE_LABELS, phase_totals
from .style import empty, flops_axis, legend_beside, new_figure, style

__all__ = ["phase_table", "executed_over_ideal", "step_costs_table", "step_cost_lines", "step_cost_bars",
           "closed_form_checks"]

VIEWS = ("ideal", "executed")


def phase_table(runs: pd.DataFrame, group: str = "group", dense: str = "dense") -> pd.DataFrame:
    """Whole-run training FLOPs per phase, mean over the seeds of each group (rows ``(group, view)``, view
    ``ideal`` and ``executed``; groups in method order), with ``total`` and ``x dense (ideal)``: the total over
    the ideal total of the ``dense`` group, or, without one, over the ledger's count of dense training for the
    same steps (``dense_macs`` of load_runs; NaN where a run lacks it)."""
    order = sorted(range(len(runs)), key=lambda i: _method_rank(runs["method.name"].iloc[i]))
    rows = []
    for i in order:
        run = runs.iloc[i]
        dense_flops = FLOPS_PER_MAC * float(run.get("dense_macs", np.nan))
        for view in VIEWS:
            totals = phase_totals(run, view)
            rows.append({"group": run[group], "view": view, **totals.to_dict(), "total": totals.sum(),
                         "_dense": dense_flops})
    table = pd.DataFrame(rows).groupby(["group", "view"], sort=False).mean()
    dense_total = table["total"].get((dense, "ideal"), np.nan)
    table["x dense (ideal)"] = table["total"] / (dense_total if np.isfinite(dense_total) else table["_dense"])
    return table.drop(columns="_dense")


def executed_over_ideal(phases: pd.DataFrame) -> pd.Series:
    """Per group, what the machine's kernels ran over the work the masks needed (``phase_table`` rows)."""
    return (phases.xs("executed", level="view")["total"] / phases.xs("ideal", level="view")["total"]).rename(
        "executed / ideal")


def step_costs_table(reports: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per report (model, method, pattern) and one dense row per model: MACs of a normal step, an
    adaptation step, a step per layer phase, an executed step and the whole run at the config's batch; and
    ``step x dense``, ``run x dense``, ``run x srste`` (SR-STE at the same model and pattern)."""
    rows = []

    def row(rep: Mapping[str, Any], method: str, pattern: str, prefix: str, step: str, adapt: str,
            executed: str, run: str) -> dict[str, Any]:
        return {"model": rep["model"], "input": "x".join(map(str, rep["input_shape"])), "method": method,
                "pattern": pattern, "step": rep[step], "adaptation step": rep[adapt],
                **{f"step {ph}": rep[f"{prefix}by_phase"][ph] for ph in LAYER_PHASES},
                "step executed": rep[executed], "run": rep[run]}

    for rep in reports:
        if not any(r["model"] == rep["model"] and r["method"] == "dense" for r in rows):
            rows.append(row(rep, "dense", DENSE_PATTERN, "dense_step_", "dense_step_macs", "dense_step_macs",
                            "dense_step_macs", "dense_run_total_macs"))
        rows.append(row(rep, rep["method"], rep["pattern"], "step_", "step_macs", "adapt_step_macs",
                        "step_executed_macs", "run_total_macs"))
    costs = pd.DataFrame(rows)
    macs = [c for c in costs.columns if c.startswith(("step", "adaptation", "run"))]
    costs[macs] = costs[macs].astype(float)  # exact integers, shown with 4 significant digits
    dense = costs[costs["method"] == "dense"].set_index("model")
    costs["step x dense"] = costs["step"] / costs["model"].map(dense["step"])
    costs["run x dense"] = costs["run"] / costs["model"].map(dense["run"])
    srste = costs[costs["method"] == "srste"].set_index(["model", "pattern"])["run"]
    costs["run x srste"] = [r / srste.get((m, p), np.nan) for m, p, r in zip(costs["model"], costs["pattern"],
                                                                             costs["run"])]
    return costs


def _model_at(costs: pd.DataFrame, model: str, pattern: str) -> pd.DataFrame:
    """The dense row and the rows at ``pattern`` of ``model``, indexed by method."""
    return costs[(costs["model"] == model) & costs["pattern"].isin([DENSE_PATTERN, pattern])].set_index("method")


def step_cost_lines(costs: pd.DataFrame, model: str = "resnet50", pattern: str = "1:16") -> list[str]:
    """BAME against SR-STE and dense at ``pattern`` of ``model``, per training step and over the run, in words
    (empty when one of the three is missing)."""
    at = _model_at(costs, model, pattern)
    if not {"bame", "srste", "dense"} <= set(at.index):
        return []
    b, s, d = at.loc["bame"], at.loc["srste"], at.loc["dense"]
    return [f"{model}, input {b['input']}, {pattern}, MACs per training step (FLOPs = 2 x MACs):",
            f"  dense          {d['step']:.4g}",
            f"  SR-STE         {s['step']:.4g}  = {s['step'] / d['step']:.3f} x dense",
            f"  BAME, normal   {b['step']:.4g}  = {b['step'] / d['step']:.3f} x dense, "
            f"{s['step'] / b['step']:.2f}x fewer than SR-STE",
            f"  BAME, adapting {b['adaptation step']:.4g}  (every block a candidate: the weight gradient is dense)",
            f"whole run (this config's schedule): SR-STE / BAME = {s['run'] / b['run']:.2f}x, "
            f"dense / BAME = {d['run'] / b['run']:.2f}x"]


def step_cost_bars(costs: pd.DataFrame, model: str = "resnet50", pattern: str = "1:16") -> Figure:
    """One normal training step of ``model`` per method (dense and ``pattern``), FLOPs stacked by phase (ideal),
    with what this machine's kernels executed as a cross."""
    view = costs[(costs["model"] == model) & costs["pattern"].isin([DENSE_PATTERN, pattern])]
    view = view.sort_values("method", key=lambda m: m.map(_method_rank), kind="stable").reset_index(drop=True)
    with style():
        fig, ax = new_figure(7.2, 3.8)
        if view.empty:
            empty(ax, f"no step costs of {model} at {pattern}")
            return fig
        labels = [m if p == DENSE_PATTERN else f"{m} {p}" for m, p in zip(view["method"], view["pattern"])]
        bottom = np.zeros(len(view))
        for ph in LAYER_PHASES:
            values = FLOPS_PER_MAC * view[f"step {ph}"].to_numpy(float)
            ax.bar(labels, values, bottom=bottom, label=PHASE_LABELS[ph])
            bottom += values
        ax.plot(labels, FLOPS_PER_MAC * view["step executed"].to_numpy(float), "kx", ms=8,
                label="executed here (all phases)")
        flops_axis(ax.yaxis, "FLOPs per training step")
        ax.set_title(f"{model}: one normal training step by phase (ideal)", loc="left")
        legend_beside(fig, *ax.get_legend_handles_labels())
    return fig


def closed_form_checks(reports: Mapping[tuple[str, str, str], Mapping[str, Any]], model: str = "resnet50",
                       pattern: str = "1:16", methods: Sequence[str] = ("srste", "bame")) -> pd.DataFrame:
    """Per N:M layer of ``model`` at ``pattern``, the counted MACs of a step against docs/method.md's closed
    forms: SR-STE ``f_S + input_grad + f_D``, BAME ``f_S + input_grad + f_S`` on a normal step and
    ``f_S + input_grad + f_D`` on an adaptation step with every block a candidate (``f_D``: the dense model's
    forward, ``f_S`` the sparse one). ``reports`` maps ``(model, method, pattern)`` to a ``bame flops`` report."""
    checks = []
    for method in methods:
        rep = reports.get((model, method, pattern))
        if rep is None:
            continue
        for layer in (e for e in rep["layers"] if e["sparse"]):
            f_d, f_s = layer["dense"]["forward"]["ideal"], layer["step"]["forward"]["ideal"]
            in_grad = layer["step"].get("input_grad", {}).get("ideal", 0)  # 0 only for a first layer
            step = sum(v["ideal"] for v in layer["step"].values())
            adapt = sum(v["ideal"] for v in layer["adapt"].values())
            expected_step = (f_s + in_grad + f_d) if method == "srste" else (f_s + in_grad + f_s)
            checks.append({"method": method, "layer": layer["layer"], "f_D": f_d, "f_S": f_s,
                           "f_S / f_D": f_s / f_d, "step": step, "closed form": expected_step,
                           "adaptation step": adapt, "closed form (adapt)": f_s + in_grad + f_d})
    return pd.DataFrame(checks)
