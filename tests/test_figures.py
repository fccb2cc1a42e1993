"""The figures of analysis/: readable layout (no text outside the figure or over another text), SI FLOPs
axes, and the numbers each draws, checked against the runs' own files (the real runs of ``runs_root``)."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import analysis


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _study_points(n_seeds: int = 3) -> pd.DataFrame:
    """A hand-built per-run table at the study's scale: 5 methods x 3 patterns and 16 BAME readings at
    1:16 with long settings, one family of readings (t_f at four fractions), seeded numbers."""
    rng = np.random.default_rng(0)
    rows = []

    def add(group, method, pattern, top1, flops, settings="", family=None):
        for seed in range(n_seeds):
            rows.append({"run_id": f"{group}-s{seed}", "group": group, "method": method, "pattern": pattern,
                         "settings": settings, "family": family, "experiment": "fashion-mnist / lenet5_wide",
                         "seed": seed, "top1": top1 + rng.normal(0, 0.4), "train_flops": flops * (1 + rng.normal(0, 0.002))})

    add("dense", "dense", "dense", 89.8, 1.73e12)
    for pattern, scale in (("2:4", 1.0), ("1:4", 0.62), ("1:16", 0.33)):
        for method, cost in (("static", 0.57), ("ste", 0.71), ("srste", 0.71), ("bame", 0.57)):
            add(f"{method} {pattern}", method, pattern, 89.5 - 4 * (1 - scale), 1.73e12 * cost * (scale + 0.4))
    for i, settings in enumerate(["lma=gradient, block_rows=16", "lma=gradient, obf=False",
                                  "lma=gradient, tau=0.2, min_changes=1", "lma=gradient, score_steps=10",
                                  "lma=gradient, rho=0.0125, score_steps=10", "lma=gradient, regrow=zero",
                                  "obf_bias_correction=True", "selection=joint", "interval_steps=20",
                                  "rho=0.2", "lma=gradient, block_rows=4", "regrow=zero"]):
        add(f"bame 1:16 ({settings})", "bame", "1:16", 85.5 - 0.5 * i, 3.2e11 * (1 + 0.01 * i), settings)
    for t_f in (0.2, 0.4, 0.6, 0.8):
        add(f"bame 1:16 (t_f_fraction={t_f})", "bame", "1:16", 84 + 2 * t_f, 3.2e11 * (1 + t_f / 10),
            f"t_f_fraction={t_f}", family="bame 1:16 (phased)")
    return pd.DataFrame(rows)


def _step_reports() -> list[dict]:
    """Hand-built ``bame flops`` reports of a ResNet-50 at 1:16 (SR-STE and BAME), at the scale of the real one."""
    def report(method: str, step: dict, executed: float, run: float) -> dict:
        return {"model": "resnet50", "input_shape": [256, 3, 224, 224], "method": method, "pattern": "1:16",
                "step_macs": sum(step.values()), "adapt_step_macs": 1.2 * sum(step.values()), "step_by_phase": step,
                "step_executed_macs": executed, "run_total_macs": run, "dense_step_macs": 3.0e12,
                "dense_step_by_phase": {"forward": 1e12, "input_grad": 1e12, "weight_grad": 1e12},
                "dense_run_total_macs": 1.5e18}

    return [report("srste", {"forward": 6.3e10, "input_grad": 6.3e10, "weight_grad": 1e12}, 3e12, 5.6e17),
            report("bame", {"forward": 6.3e10, "input_grad": 6.3e10, "weight_grad": 6.3e10}, 3e12, 2.4e17)]


def _ablation() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """An ablation of tau (two variants) against its reference and the static control: runs, table, deltas."""
    from test_notebook_analysis import _paper_rows

    base = _paper_rows(**{"method.bame.tau": 0.5})
    base = base[base["method.pattern"] == "1:16"]
    bame = base[base["method.name"] == "bame"]
    variants = pd.concat([bame.assign(**{"method.bame.tau": tau, "top1": bame["top1"] + d, "run_id": bame["run_id"] + str(tau)})
                          for tau, d in ((0.3, 1.0), (0.8, -2.0))])
    runs = analysis.ablation_runs({"reference": bame, "variant": variants,
                                   "control": base[base["method.name"] == "static"]}, ["method.bame.tau"])
    table = analysis.ablation_table(runs)
    return runs, table, analysis.ablation_deltas({"tau": table, "rho": table}, {"tau": "tau", "rho": "rho (again)"})


def _mask_arrays() -> dict:
    from bame.nm import nm_mask
    import torch

    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    return {p: (nm_mask(scores, n, m).numpy(), m) for p, (n, m) in (("2:4", (2, 4)), ("1:16", (1, 16)))}


def _figure_builders(runs: pd.DataFrame, runs_root: Path, tmp: Path) -> dict:
    """Every figure function of analysis, on the real runs, on no runs, and at the study's scale."""
    bame = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")].iloc[0]
    empty = analysis.load_runs(tmp)
    study = _study_points()
    study_readings = analysis.readings_table(study[study["family"].isna()])
    no_blocks = shutil.copytree(bame["path"], tmp / "no-snapshots", ignore=shutil.ignore_patterns("blocks"))
    srste = runs[(runs["method.name"] == "srste") & (runs["status"] == "completed")].iloc[0]
    deep = shutil.copytree(srste["path"], tmp / "runs-deep" / "deep", ignore=shutil.ignore_patterns("checkpoints"))
    ablation = _ablation()
    masks = pd.read_csv(deep / "masks.csv")  # a model with 20 N:M layers: one legend entry each
    pd.concat([masks.assign(layer=f"layer{i // 6 + 1}.{i % 3}.conv{i % 2 + 1}.{i}") for i in range(20)]).to_csv(
        deep / "masks.csv", index=False)
    return {
        "pareto_scatter": lambda: analysis.pareto_scatter(analysis.run_points(runs)),
        "pareto_scatter:study": lambda: analysis.pareto_scatter(study),
        "pareto_scatter:empty": lambda: analysis.pareto_scatter(analysis.run_points(empty)),
        "pareto_scatter:groups": lambda: analysis.pareto_scatter(study[study["pattern"] == "1:16"], legend="groups"),
        "forest_plot": lambda: analysis.forest_plot(analysis.readings_table(analysis.run_points(runs))),
        "forest_plot:study": lambda: analysis.forest_plot(study_readings),
        "forest_plot:empty": lambda: analysis.forest_plot(analysis.readings_table(analysis.run_points(empty))),
        "training_loss": lambda: analysis.training_loss(runs),
        "training_loss:empty": lambda: analysis.training_loss(empty),
        "layer_flips": lambda: analysis.layer_flips(runs),
        "layer_flips:empty": lambda: analysis.layer_flips(empty),
        "layer_flips:20 layers": lambda: analysis.layer_flips(analysis.load_runs(tmp / "runs-deep")),
        "accuracy_vs_flops": lambda: analysis.accuracy_vs_flops(runs),
        "accuracy_vs_flops:logx": lambda: analysis.accuracy_vs_flops(runs, logx=True),
        "mask_flips": lambda: analysis.mask_flips(runs),
        "mask_flips:fraction": lambda: analysis.mask_flips(runs, value="flip_fraction"),
        "mask_flips:cumulative": lambda: analysis.mask_flips(runs, value="cumulative"),
        "frozen_fraction": lambda: analysis.frozen_fraction(runs),
        "phase_breakdown": lambda: analysis.phase_breakdown(runs),
        "phase_breakdown:executed": lambda: analysis.phase_breakdown(runs, view="executed"),
        "phase_breakdown:empty": lambda: analysis.phase_breakdown(empty),
        "oscillation_heatmaps": lambda: analysis.oscillation_heatmaps(bame),
        "oscillation_heatmaps:adaptation.csv": lambda: analysis.oscillation_heatmaps(no_blocks),
        "learning_curves": lambda: analysis.learning_curves(analysis.load_metrics(bame), "BAME 2:4"),
        "mask_image": lambda: analysis.mask_image(_mask_arrays(), "layer1.0.conv1"),
        "step_cost_bars": lambda: analysis.step_cost_bars(analysis.step_costs_table(_step_reports())),
        "step_cost_bars:empty": lambda: analysis.step_cost_bars(analysis.step_costs_table(_step_reports()), "vgg16"),
        "ablation_figure": lambda: analysis.ablation_figure(ablation[1], ablation[0], "Ablation: tau (1:16, 2 seeds)"),
        "ablation_figure:empty": lambda: analysis.ablation_figure(ablation[1].iloc[:0], ablation[0], "nothing"),
        "ablations_figure": lambda: analysis.ablations_figure(ablation[2]),
        "ablations_figure:empty": lambda: analysis.ablations_figure(ablation[2].iloc[:0]),
    }


def test_every_figure_function_is_checked_for_layout(runs, runs_root, tmp_path):
    figure_functions = {name for name in analysis.__all__
                        if inspect.isfunction(fn := getattr(analysis, name))
                        and inspect.signature(fn).return_annotation in ("Figure", "plt.Figure")}
    checked = {name.split(":")[0] for name in _figure_builders(runs, runs_root, tmp_path)}
    assert figure_functions and figure_functions <= checked, figure_functions - checked


def test_no_text_lies_outside_a_figure_or_over_another_text(runs, runs_root, tmp_path):
    problems = {}
    for name, build in _figure_builders(runs, runs_root, tmp_path).items():
        fig = build()
        found = analysis.text_problems(fig)
        if found:
            problems[name] = found
        plt.close(fig)
    assert not problems, problems


def test_the_layout_check_flags_a_broken_layout():
    """The old ablation figure's faults: an offset text over the x label, a legend beside the axes but
    outside the figure, tick labels run together; a clean figure passes."""
    fig, ax = plt.subplots(figsize=(4, 3))
    for i in range(12):
        ax.plot([1.0e11, 3.2e11], [i, i + 1], label=f"bame 1:16 (reading {i})")
    ax.set_xlabel("cumulative training FLOPs (ideal; FLOPs = 2 x MACs)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    problems = analysis.text_problems(fig)
    assert any("'1e11' overlaps" in p or "overlaps text '1e11'" in p for p in problems), problems
    assert any("'bame 1:16 (reading 0)' lies outside the figure" in p for p in problems), problems

    fig, ax = plt.subplots(figsize=(2.0, 1.5), layout="constrained")
    ax.plot([0, 1], [0, 1])
    ax.set_xticks([0.0, 0.5, 1.0], ["300 MFLOPs", "400 MFLOPs", "500 MFLOPs"])
    assert any("'300 MFLOPs' overlaps text '400 MFLOPs'" in p for p in analysis.text_problems(fig))

    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.plot([0, 1], [0, 1], label="one")
    ax.set(xlabel="x", ylabel="y", title="a clean figure")
    ax.legend()
    assert analysis.text_problems(fig) == []


def test_flops_axes_read_in_si_units_without_an_offset(runs):
    for fig, axis in ((analysis.pareto_scatter(analysis.run_points(runs)), "x"),
                      (analysis.phase_breakdown(runs), "x"), (analysis.accuracy_vs_flops(runs), "x"),
                      (analysis.pareto_scatter(_study_points()), "x")):
        fig.canvas.draw()
        ax = fig.axes[0]
        axis_obj = ax.xaxis if axis == "x" else ax.yaxis
        labels = [t.get_text() for t in axis_obj.get_ticklabels() if t.get_text()]
        assert labels and all(label.endswith("FLOPs") for label in labels), labels
        assert axis_obj.get_offset_text().get_text() == ""
    assert "1.2 TFLOPs" in [t.get_text() for t in _ticks(analysis.pareto_scatter(pd.DataFrame({
        "group": ["a", "b"], "method": ["dense", "bame"], "pattern": ["dense", "1:16"], "top1": [80.0, 70.0],
        "train_flops": [1.2e12, 0.4e12]})))]


def _ticks(fig):
    fig.axes[0].set_xticks([0.4e12, 1.2e12])
    fig.canvas.draw()
    return fig.axes[0].xaxis.get_ticklabels()


# --------------------------------------------------------------------------------------------------
# the per-run table and the comparisons


def test_run_points_has_one_tidy_row_per_completed_run(runs):
    points = analysis.run_points(runs)
    done = runs[runs["status"] == "completed"]
    assert list(points.columns[:10]) == analysis.groups.POINT_COLUMNS
    assert sorted(points["run_id"]) == sorted(done["run_id"])
    for _, p in points.iterrows():
        row = done[done["run_id"] == p["run_id"]].iloc[0]
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert p["top1"] == pytest.approx(100 * summary["final"]["test_acc"])
        assert p["train_flops"] == summary["flops"]["ideal_flops"]
        assert p["method"] == summary["method"] and p["seed"] == row["train.seed"]
        assert p["pattern"] == ("dense" if p["method"] == "dense" else summary["pattern"])
        assert p["group"] == analysis.run_groups(done).loc[row.name] and p["settings"] == ""
    # a group key: settings name what differs from the reference reading, the reference has none
    points = analysis.run_points(runs, by=["method.bame.rho"], reference={"method.bame.rho": 0.05})
    bame = points[points["method"] == "bame"]
    assert set(bame["settings"]) == {"rho=0.2"} and set(bame["group"]) == {"bame 2:4 (rho=0.2)"}
    assert set(points[points["method"] != "bame"]["settings"]) == {""}  # rho does not apply to them
    # a family: the groups that differ only in the family key share one
    family = analysis.run_points(runs, family_by="method.bame.rho")
    assert set(family[family["method"] == "bame"]["family"]) == {"bame 2:4"}
    assert family[family["method"] != "bame"]["family"].isna().all()
    with pytest.raises(KeyError, match="no config key 'method.bame.nope'"):
        analysis.run_points(runs, by=["method.bame.nope"])


def test_pareto_scatter_marks_each_group_mean_with_its_spread_and_the_front():
    points = _study_points()
    fig = analysis.pareto_scatter(points)
    ax = fig.axes[0]
    means = analysis.group_means(points)
    bars = {c.lines[0].get_gid(): c for c in ax.containers}
    assert len(bars) == len(means)
    for _, g in means.iterrows():
        sel = points[points["group"] == g["group"]]
        container = bars[f"group:{g['group']}"]
        x, y = container.lines[0].get_data()
        assert x[0] == pytest.approx(sel["train_flops"].mean()) and y[0] == pytest.approx(sel["top1"].mean())
        (xerr,), (yerr,) = (c.get_segments() for c in container.lines[2])
        assert xerr[1, 0] - xerr[0, 0] == pytest.approx(2 * sel["train_flops"].std(ddof=1))
        assert yerr[1, 1] - yerr[0, 1] == pytest.approx(2 * sel["top1"].std(ddof=1))
        assert container.lines[0].get_color() == analysis.style.method_color(g["method"])
        assert container.lines[0].get_marker() == analysis.style.pattern_marker(g["pattern"])
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    front = analysis.pareto_front(means)
    np.testing.assert_allclose(lines["pareto-front"].get_xdata(), front["flops_mean"])
    # nothing beats a point of the front: no group has fewer FLOPs and a higher top-1
    for _, f in front.iterrows():
        assert not ((means["flops_mean"] <= f["flops_mean"]) & (means["top1_mean"] > f["top1_mean"])).any()
    # every group off the front is beaten by one on it
    for _, g in means[~means.index.isin(front.index)].iterrows():
        assert ((front["flops_mean"] <= g["flops_mean"]) & (front["top1_mean"] >= g["top1_mean"])).any()
    family = means[means["family"] == "bame 1:16 (phased)"].sort_values("flops_mean")
    np.testing.assert_allclose(lines["family:bame 1:16 (phased)"].get_ydata(), family["top1_mean"])
    with pytest.raises(ValueError, match="lacks column"):
        analysis.pareto_scatter(points.drop(columns=["train_flops"]))


def test_pareto_scatter_by_group_names_every_group_and_tells_a_methods_groups_apart():
    points = _study_points()
    points = points[points["pattern"] == "1:16"]
    fig = analysis.pareto_scatter(points, legend="groups")
    means = analysis.group_means(points)
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(means["group"]) <= set(legend_texts)
    bars = {c.lines[0].get_gid(): c.lines[0] for c in fig.axes[0].containers}
    for method, g in means.groupby("method"):
        looks = [(bars[f"group:{label}"].get_color(), bars[f"group:{label}"].get_marker()) for label in g["group"]]
        assert len(set(looks)) == min(len(looks), len(analysis.pareto.GROUP_MARKERS)), method
    with pytest.raises(ValueError, match="legend must be"):
        analysis.pareto_scatter(points, legend="nope")


def test_pareto_front_by_hand():
    table = pd.DataFrame({"flops_mean": [1.0, 2.0, 2.0, 3.0, 4.0], "top1_mean": [50.0, 60.0, 55.0, 58.0, 70.0]})
    assert analysis.pareto_front(table).index.tolist() == [0, 1, 4]


def test_forest_plot_draws_each_reading_against_the_control_sorted():
    points = _study_points()
    points = points[points["pattern"] == "1:16"]
    readings = analysis.readings_table(points)
    fig = analysis.forest_plot(readings)
    (ax,) = fig.axes  # one experiment and pattern: one panel
    control = readings[readings["is_control"]].iloc[0]
    assert control["method"] == "static"
    band = next(p for p in ax.patches if p.get_gid() == "control-band")
    assert band.get_x() == pytest.approx(-control["control_std"])
    assert band.get_x() + band.get_width() == pytest.approx(control["control_std"])
    shown = {}
    for container in ax.containers:
        x, y = container.lines[0].get_data()
        shown[container.lines[0].get_gid().removeprefix("reading:")] = (x[0], y[0])
    others = readings[~readings["is_control"]]
    assert set(shown) == set(others["group"])
    for _, r in others.iterrows():
        sel = points[points["group"] == r["group"]]["top1"]
        ctrl = points[points["group"] == control["group"]]["top1"]
        assert shown[r["group"]][0] == pytest.approx(sel.mean() - ctrl.mean())
    order = sorted(shown, key=lambda g: shown[g][1])  # y grows downwards: best first
    deltas = [shown[g][0] for g in order]
    assert deltas == sorted(deltas, reverse=True)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "srste 1:16" not in labels and "srste: dense backward" in labels


def test_training_loss_and_layer_flips_are_the_runs_means(runs):
    done = runs[runs["status"] == "completed"]
    labels = analysis.run_groups(done)
    lines = {line.get_gid(): line for ax in analysis.training_loss(done).axes for line in ax.lines}
    for label in set(labels):
        losses = []
        for _, row in done[labels == label].iterrows():
            m = analysis.load_metrics(row)
            losses.append(m[m["split"] == "train"].set_index("step")["loss"])
        mean = pd.concat(losses, axis=1).mean(axis=1)
        np.testing.assert_allclose(lines[f"mean:{label}"].get_ydata(), mean.to_numpy())
    flips = {line.get_gid(): line for ax in analysis.layer_flips(done).axes for line in ax.lines}
    srste = done[done["method.name"] == "srste"]
    for layer in analysis.load_masks(srste.iloc[0])["layer"].unique():
        totals = []
        for _, run in srste.iterrows():
            masks = analysis.load_masks(run)
            totals.append(masks.loc[masks["layer"] == layer, "flip_fraction"].sum())
        assert flips[f"srste 2:4|{layer}"].get_ydata()[-1] == pytest.approx(np.mean(totals))
    assert not any(gid.startswith(("static", "dense")) for gid in flips)  # masks that never changed


def test_readings_table_by_hand():
    points = pd.DataFrame({
        "group": ["static 1:16"] * 2 + ["srste 1:16"] * 2 + ["bame 1:16"] * 2 + ["bame 1:16 (rho=0.2)"] * 2,
        "method": ["static"] * 2 + ["srste"] * 2 + ["bame"] * 4, "pattern": ["1:16"] * 8,
        "settings": [""] * 6 + ["rho=0.2"] * 2, "experiment": ["d / m"] * 8, "seed": [0, 1] * 4,
        "top1": [80.0, 82.0, 85.0, 86.0, 79.0, 81.0, 84.0, 85.0], "train_flops": [1.0] * 8})
    table = analysis.readings_table(points)
    assert table["group"].tolist() == ["static 1:16", "srste 1:16", "bame 1:16 (rho=0.2)", "bame 1:16"]
    assert table["delta"].tolist() == [0.0, 4.5, 3.5, -1.0]
    assert table["top1_std"].iloc[0] == pytest.approx(math.sqrt(2))
    shown = analysis.format_readings_table(table, reference_label="(default)")
    assert shown["settings"].tolist() == ["fixed magnitude mask", "dense backward", "rho=0.2", "(default)"]
    assert shown["vs static"].tolist() == ["+0.00", "+4.50", "+3.50", "-1.00"]
    # no control: nothing to compare
    assert analysis.readings_table(points[points["method"] != "static"]).empty
