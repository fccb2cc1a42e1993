"""The analysis the notebooks call (tables of masks, costs, ablations, the published comparison), on real run
folders (tests/conftest.py) and real ``bame flops`` reports, against the numbers recomputed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

import analysis
from bame import models
from bame.config import load_config
from bame.flops_report import flops_report
from bame.layers import mask_table, sparsify

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs[runs["status"] == "completed"].copy()
    runs["group"] = analysis.run_groups(runs)
    return runs


def test_mask_table_checks_every_n_m_layer():
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, in_channels=3)
    report = sparsify(model, "1:4")
    rows = mask_table(model)
    assert [r["layer"] for r in rows] == report.sparse_names
    assert all(r["pattern"] == "1:4" and r["density"] == 0.25 for r in rows)
    assert all(r["exactly N per group"] and r["zeros outside the mask"] for r in rows)
    layer = dict(model.named_modules())[rows[0]["layer"]]
    with torch.no_grad():
        layer.mask[0, 0] = ~layer.mask[0, 0]  # one group now keeps 0 or 2 of 4
    assert not mask_table(model)[0]["exactly N per group"]


def test_mask_stats_and_their_mean_and_std(runs):
    runs = _completed(runs)
    stats = analysis.mask_stats(runs)
    assert list(stats.columns) == ["group", *analysis.MASK_STAT_DIGITS]
    for (_, run), (_, row) in zip(runs.iterrows(), stats.iterrows()):
        masks, adapt = analysis.load_masks(run), analysis.load_adaptation(run)
        assert row["mask flips"] == masks["flips"].sum() and row["top-1 (%)"] == run["top1"]
        if run["method.name"] == "bame":
            last = adapt[adapt["step"] == adapt["step"].max()]
            assert row["oscillation events"] == adapt["oscillation_events"].sum()
            assert row["frozen at last adaptation (%)"] == 100 * last["frozen_blocks"].sum() / last["num_blocks"].sum()
        else:
            assert math.isnan(row["oscillation events"]) and math.isnan(row["frozen at last adaptation (%)"])
    table = analysis.mean_std_table(stats, "group", analysis.MASK_STAT_DIGITS)
    bame = stats[stats["group"] == runs.loc[runs["method.name"] == "bame", "group"].iloc[0]]
    cell = table.loc[bame["group"].iloc[0]]
    assert cell["seeds"] == len(bame) == 2
    assert cell["top-1 (%)"] == f"{bame['top-1 (%)'].mean():.2f} ± {bame['top-1 (%)'].std():.2f}"
    assert cell["oscillation events"] == f"{bame['oscillation events'].mean():.0f} ± {bame['oscillation events'].std():.0f}"
    static = table.loc[runs.loc[runs["method.name"] == "static", "group"].iloc[0]]
    assert static["oscillation events"] == "–"


def test_mean_std_table_formats_one_seed_without_spread():
    df = pd.DataFrame({"g": ["a", "a", "b"], "x": [1.0, 3.0, 5.0]})
    table = analysis.mean_std_table(df, "g", {"x": 1})
    assert table["x"].tolist() == ["2.0 ± 1.4", "5.0"] and table["seeds"].tolist() == [2, 1]


def test_block_summary_is_the_last_snapshot_per_layer(runs):
    runs = _completed(runs)
    bame = runs[runs["method.name"] == "bame"].iloc[0]
    step, per_layer = analysis.block_summary(bame)
    blocks = analysis.load_blocks(bame)
    assert step == blocks["step"].max()
    adapt = analysis.load_adaptation(bame)
    last = adapt[adapt["step"] == step].set_index("layer")
    assert per_layer["blocks"].to_dict() == last["num_blocks"].to_dict()
    assert (per_layer["frozen"] * per_layer["blocks"]).round().astype(int).to_dict() == last["frozen_blocks"].to_dict()
    assert analysis.block_summary(runs[runs["method.name"] == "static"].iloc[0]) is None


def test_phase_table_is_the_mean_over_seeds_of_flops_csv(runs):
    runs = _completed(runs)
    phases = analysis.phase_table(runs)
    assert phases.loc[("dense", "ideal"), "x dense (ideal)"] == 1.0
    groups = list(dict.fromkeys(phases.index.get_level_values("group")))
    group_of = runs.groupby("method.name")["group"].first()
    assert groups == [group_of[m] for m in ("dense", "static", "srste", "bame")]  # the tables' method order
    srste = runs[runs["method.name"] == "srste"]
    by_run = [2 * analysis.load_flops(r).groupby("phase")["ideal_macs"].sum() for _, r in srste.iterrows()]
    expected = pd.concat(by_run, axis=1).mean(axis=1)
    for phase, value in expected.items():
        assert phases.loc[(srste["group"].iloc[0], "ideal"), phase] == pytest.approx(value)
    ratio = analysis.executed_over_ideal(phases)
    assert ratio["dense"] == 1.0 and (ratio >= 1.0).all()


@pytest.fixture(scope="module")
def reports():
    """Real ``bame flops`` reports of configs/quick.yaml (LeNet-5), SR-STE and BAME at 2:4."""
    out = {}
    for method in ("srste", "bame"):
        cfg = load_config(QUICK, [f"method.name={method}", "method.pattern=2:4"])
        out[(cfg.model.name, method, "2:4")] = flops_report(cfg, measure_batch=1)
    return out


def test_step_costs_and_the_closed_forms(reports):
    costs = analysis.step_costs_table(reports.values())
    assert costs["method"].tolist() == ["dense", "srste", "bame"]
    dense, srste, bame = (costs.iloc[i] for i in range(3))
    rep = reports[("lenet5", "bame", "2:4")]
    assert bame["step"] == rep["step_macs"] and dense["step"] == rep["dense_step_macs"]
    assert bame["step forward"] == rep["step_by_phase"]["forward"]
    assert srste["run x srste"] == 1.0 and bame["run x srste"] == bame["run"] / srste["run"]
    assert dense["step x dense"] == 1.0 and bame["step x dense"] < srste["step x dense"] < 1.0
    checks = analysis.closed_form_checks(reports, "lenet5", "2:4")
    assert len(checks) and (checks["step"] == checks["closed form"]).all()
    assert (checks["adaptation step"] == checks["closed form (adapt)"]).all()
    assert np.allclose(checks["f_S / f_D"], 0.5)
    lines = analysis.step_cost_lines(costs, "lenet5", "2:4")
    assert f"{srste['step'] / bame['step']:.2f}x fewer than SR-STE" in lines[3]
    assert analysis.step_cost_lines(costs, "resnet50", "1:16") == []


def _paper_rows(**sets) -> pd.DataFrame:
    """A load_runs-like table: BAME and SR-STE at 2:4 and 1:16, and static, two seeds each."""
    rows = []
    for method, top1, macs in (("bame", 85.0, 3e9), ("srste", 86.0, 8e9), ("static", 84.0, 2.5e9)):
        for pattern in ("2:4", "1:16"):
            for seed in (0, 1):
                rows.append({"run_id": f"{method}-{pattern}-{seed}", "path": "", "status": "completed",
                             "method.name": method, "method.pattern": pattern, "train.seed": seed,
                             "data.name": "synthetic", "model.name": "lenet5", "top1": top1 + seed,
                             "ideal_macs": macs, "executed_macs": 2 * macs, "wall_time_s": 1.0,
                             "ideal_x_dense": macs / 1e10, **sets})
    return pd.DataFrame(rows)


def test_the_published_comparison_takes_our_sparsest_pattern():
    table = analysis.paper_table(_paper_rows())
    side = analysis.published_comparison(table, analysis.load_published(), ours="here")
    ours = side["here: synthetic / lenet5 / 1:16"]
    assert ours["BAME top-1 (%)"] == "85.50 ± 0.71" and ours["BAME - SR-STE (points)"] == "-1.00"
    assert ours["training FLOPs, SR-STE / BAME"] == "2.67x" and ours["training FLOPs, dense / BAME"] == "3.33x"
    theirs = side["published: imagenet / resnet50 / 1:16"]
    assert theirs["BAME - SR-STE (points)"] == "+0.5" and theirs["training FLOPs, SR-STE / BAME"] == "2.37x (as stated)"


def test_an_ablation_against_its_reference_and_control():
    runs = _paper_rows(**{"method.bame.tau": 0.5})
    runs = runs[runs["method.pattern"] == "2:4"]
    variant = runs[runs["method.name"] == "bame"].assign(**{"method.bame.tau": 0.3, "top1": [88.0, 89.0],
                                                             "run_id": ["v0", "v1"]})
    parts = {"reference": runs[runs["method.name"] == "bame"], "variant": variant,
             "control": runs[runs["method.name"] == "static"]}
    keys = analysis.ablation_keys(["method.bame.tau=0.3", "method.bame.tau=0.8 method.bame.obf=false"])
    assert keys == ["method.bame.obf", "method.bame.tau"]
    both = analysis.ablation_runs(parts, ["method.bame.tau"])
    assert sorted(set(both["setting"])) == ["static (control)", "tau=0.3", "tau=0.5 (reference)"]
    table = analysis.ablation_table(both)
    shown = analysis.format_ablation_table(table).set_index("setting")
    assert shown.loc["tau=0.3", "top-1 (%)"] == "88.50 ± 0.71" and shown.loc["static (control)", "x static"] == 1.0
    deltas = analysis.ablation_deltas({"tau": table}, {"tau": "tau"})
    assert deltas.to_dict("records") == [{"ablation": "tau", "variant": "tau=0.3", "delta top-1 vs reference": 3.0,
                                          "delta FLOPs vs reference (%)": 0.0}]


def test_an_ablation_whose_variant_is_its_reference_is_refused():
    # the stale ablation: the default moved to tau=0.3 and the variant still sweeps tau=0.3
    runs = _paper_rows(**{"method.bame.tau": 0.3})
    runs = runs[runs["method.pattern"] == "2:4"]
    bame_runs = runs[runs["method.name"] == "bame"]
    parts = {"reference": bame_runs, "variant": bame_runs.assign(run_id=["v0", "v1"]),
             "control": runs[runs["method.name"] == "static"]}
    with pytest.raises(ValueError, match="tau=0.3 is the reference itself"):
        analysis.ablation_runs(parts, ["method.bame.tau"])


def test_a_study_ablation_takes_the_group_at_the_defaults_as_its_reference():
    runs = _paper_rows(**{"method.bame.tau": 0.5, "method.bame.rho": 0.0125})
    runs = runs[runs["method.pattern"] == "1:16"]
    others = runs[runs["method.name"] == "bame"].assign(**{"method.bame.tau": 0.2, "run_id": ["t0", "t1"]})
    study = pd.concat([runs, others], ignore_index=True)
    defaults = {"method.bame.tau": 0.5}
    both = analysis.study_ablation_runs(study, {"method.name": "bame"}, ["method.bame.tau"], defaults)
    assert both.groupby("setting")["run_id"].apply(sorted).to_dict() == {
        "static (control)": ["static-1:16-0", "static-1:16-1"], "tau=0.2": ["t0", "t1"],
        "tau=0.5 (reference)": ["bame-1:16-0", "bame-1:16-1"]}
    with pytest.raises(LookupError, match="at the defaults"):  # the study has no run at the default
        analysis.study_ablation_runs(study, {"method.name": "bame"}, ["method.bame.tau"], {"method.bame.tau": 0.1})
    with pytest.raises(LookupError, match="besides the one at the defaults"):
        analysis.study_ablation_runs(study, {"method.name": "bame", "method.bame.tau": 0.5}, ["method.bame.tau"],
                                     defaults)
    with pytest.raises(KeyError, match="no config key 'method.bame.nope'"):
        analysis.matching(study, {"method.bame.nope": 1})


def test_readings_are_named_in_the_words_of_the_method_page():
    defaults = {"method.bame.tau": 0.5, "method.bame.rho": 0.0125, "method.bame.lma": "gradient",
                "method.phased.switch_fraction": 0.25}
    learning = {"method.name": "bame", "method.pattern": "1:16", "method.bame.designated_grad": "window",
                "method.bame.pruned_update": "train", "method.bame.designation": "progressive",
                "method.bame.regrow_rule": "magnitude", "method.bame.interval_steps": 1,
                "method.bame.t_f_fraction": 0.27, "method.bame.rho": 0.0125, "method.bame.rho_decay": "cosine",
                "method.bame.tau": 0.2, "method.bame.lma": "gradient"}
    assert analysis.reading_label(learning, defaults) == "learning blocks 1:16 (progressive, magnitude, T=1, t_f=0.27, tau=0.2)"
    at_defaults = {"method.name": "bame", "method.pattern": "1:16", "method.bame.designated_grad": "adaptation",
                   "method.bame.tau": 0.5, "method.bame.lma": "gradient"}
    assert analysis.reading_label(at_defaults, defaults) == "BAME 1:16"
    assert analysis.reading_label({**at_defaults, "method.bame.lma": "taylor"}, defaults) == "BAME 1:16 (lma=taylor)"
    phased = {"method.name": "phased", "method.pattern": "1:4", "method.phased.switch_fraction": 0.27}
    assert analysis.reading_label(phased, defaults) == "phased 1:4 (switch 0.27)"
    assert analysis.reading_label({"method.name": "srste", "method.pattern": "1:16"}, defaults) == "SR-STE 1:16"


def test_phase_table_without_a_dense_run_divides_by_the_ledgers_dense_count(runs):
    runs = _completed(runs)
    sparse = runs[runs["method.name"] != "dense"]
    phases = analysis.phase_table(sparse)
    for group, members in sparse.groupby("group"):
        expected = phases.loc[(group, "ideal"), "total"] / (2 * members["dense_macs"].mean())
        assert phases.loc[(group, "ideal"), "x dense (ideal)"] == pytest.approx(expected)
    assert (phases["x dense (ideal)"].xs("ideal", level="view") < 1.0).all()
