"""Tests of analysis/: readers, the paper table, figures and the report, on run folders.

The main fixture makes real run folders with short ``bame train`` runs; a few edge cases (unfinished
runs, a wrong path) use small folders written here by hand following docs/contracts.md.
"""

from __future__ import annotations

import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

import analysis
from analysis.readers import accuracy_percent

LAYERS = ("layer1.0.conv1", "fc")


# --------------------------------------------------------------------------------------------------
# hand-written run folders (contract of docs/contracts.md)


def write_run(root, method="bame", pattern="2:4", seed=0, status="completed", epochs=3, steps_per_epoch=4,
              accs=None, extra_cfg=None):
    """A small run folder as bame/runs.py writes it; returns its path."""
    rng = np.random.default_rng(seed + 17 * len(method))
    run_id = f"20250101-000000-fake-{method}-{pattern.replace(':', 'of')}-s{seed}"
    path = root / run_id
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"id": run_id, "status": status, "git": {"commit": "abc"}}))
    cfg = {"name": "fake", "data": {"name": "synthetic", "train_subset": None},
           "model": {"name": "lenet5"},
           "method": {"name": method, "pattern": pattern, "bame": {"rho": 0.05}},
           "train": {"seed": seed, "epochs": epochs, "lr": 0.1}}
    for dotted, value in (extra_cfg or {}).items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    density = 1.0 if method == "dense" else int(pattern.split(":")[0]) / int(pattern.split(":")[1])
    per_step = {"forward": 1000 * density, "input_grad": 1000 * density,
                "weight_grad": 1000 * (1.0 if method in ("dense", "srste", "ste") else density)}
    metrics, flops, masks, adapt = [], [], [], []
    cum = cum_ex = 0.0
    accs = accs or [0.3 + 0.1 * e + 0.01 * rng.random() for e in range(epochs)]
    step = 0
    for epoch in range(epochs):
        ep_macs = {p: 0.0 for p in per_step}
        ep_adapt = 0.0
        for _ in range(steps_per_epoch):
            step += 1
            step_macs = sum(per_step.values())
            if method == "bame" and step % 2 == 0:
                step_macs += 7
                ep_adapt += 7
            for p, v in per_step.items():
                ep_macs[p] += v
            cum += step_macs
            cum_ex += 3000
            metrics.append({"step": step, "epoch": step / steps_per_epoch, "split": "train", "lr": 0.1,
                            "loss": 2.0 / step, "acc": 0.5, "wall_time_s": 0.1 * step,
                            "step_ideal_macs": step_macs, "cum_ideal_macs": cum, "cum_executed_macs": cum_ex})
            if method != "dense":
                for layer in LAYERS:
                    masks.append({"step": step, "layer": layer, "flips": int(rng.integers(0, 5)),
                                  "flip_fraction": 0.0})
            if method == "bame" and step % 2 == 0:
                for layer in LAYERS:
                    adapt.append({"step": step, "layer": layer, "rho": 0.05, "num_blocks": 8,
                                  "candidate_blocks": 8, "frozen_blocks": min(8, step // 2),
                                  "selected_blocks": 1, "swaps": 1, "oscillation_events": 0, "score_mean": 0.1,
                                  "score_max": 0.2, "freq_mean": 0.1 * step, "freq_p90": 0.2,
                                  "frozen_fraction": min(8, step // 2) / 8})
                (path / "blocks").mkdir(exist_ok=True)
                np.savez(path / "blocks" / f"step_{step:08d}.npz",
                         **{f"{layer}.{f}": v for layer in LAYERS for f, v in (
                             ("frequency", rng.random(8)), ("frozen", rng.random(8) > 0.5),
                             ("last_score", rng.random(8)), ("changes", rng.integers(0, 4, 8)))})
        metrics.append({"step": step, "epoch": float(epoch + 1), "split": "test", "lr": 0.1, "loss": 1.0,
                        "acc": accs[epoch], "wall_time_s": 0.1 * step, "step_ideal_macs": float("nan"),
                        "cum_ideal_macs": cum, "cum_executed_macs": cum_ex})
        for layer in LAYERS:
            for p, v in ep_macs.items():
                flops.append({"epoch": epoch + 1, "step": step, "layer": layer, "phase": p,
                              "ideal_macs": v / len(LAYERS), "executed_macs": 1000.0 * steps_per_epoch / len(LAYERS),
                              "nm_on_reduction": p != "weight_grad"})
        if ep_adapt:
            flops.append({"epoch": epoch + 1, "step": step, "layer": "", "phase": "adaptation",
                          "ideal_macs": ep_adapt, "executed_macs": ep_adapt, "nm_on_reduction": False})
    for m in masks:
        m["flip_fraction"] = m["flips"] / 100.0
    pd.DataFrame(metrics).to_csv(path / "metrics.csv", index=False)
    pd.DataFrame(flops).to_csv(path / "flops.csv", index=False)
    if masks:
        pd.DataFrame(masks).to_csv(path / "masks.csv", index=False)
    if adapt:
        pd.DataFrame(adapt).to_csv(path / "adaptation.csv", index=False)
    if status == "completed":
        (path / "summary.json").write_text(json.dumps({
            "test_acc": accs[-1], "test_loss": 1.0, "total_ideal_macs": cum, "total_executed_macs": cum_ex,
            "wall_time_s": 0.1 * step}))
        (path / "DONE").write_text("done\n")
    return path


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_runs")
    for method in ("bame", "srste", "static", "dense"):
        for seed in (0, 1):
            write_run(root / "sweep", method=method, seed=seed)
    write_run(root / "sweep", method="bame", seed=2, status="running")
    return root


@pytest.fixture(scope="session")
def runs_root(fake_root):
    return fake_root


@pytest.fixture(scope="session")
def runs(runs_root):
    return analysis.load_runs(runs_root)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------------
# readers


def test_load_runs_one_row_per_folder_with_config_and_final_numbers(runs, runs_root):
    assert len(runs) == len(analysis.find_run_folders(runs_root))
    for col in ("run_id", "path", "status", "method.name", "method.pattern", "train.seed", "data.name",
                "model.name", "top1", "loss", "ideal_macs", "executed_macs", "ideal_flops", "wall_time_s"):
        assert col in runs, col
    done = runs[runs["status"] == "completed"]
    assert set(done["method.name"]) >= {"bame", "srste", "static", "dense"}
    assert done["top1"].between(0, 100).all()
    assert (done["ideal_macs"] > 0).all()
    assert np.allclose(done["ideal_flops"], 2 * done["ideal_macs"])
    assert "FLOPs = 2 x MACs" in runs.attrs["flops_convention"]
    for _, row in done.iterrows():
        summary = analysis.load_summary(row)
        assert summary, row["run_id"]
        metrics = analysis.load_metrics(row)
        test = metrics[metrics["split"] == "test"]
        # the final accuracy is the last evaluation's
        assert math.isclose(row["top1"], accuracy_percent(test["acc"].iloc[-1]), rel_tol=1e-9)
        assert math.isclose(row["ideal_macs"], metrics["cum_ideal_macs"].dropna().iloc[-1], rel_tol=1e-9)


def test_incomplete_runs_are_listed_with_their_status(runs):
    assert (runs["status"] != "completed").sum() >= 1
    assert set(runs["status"]) <= {"completed", "running", "failed", "interrupted", "unknown"}


def test_per_run_tables_accept_a_path_or_a_row(runs):
    row = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")].iloc[0]
    by_row = analysis.load_metrics(row)
    by_path = analysis.load_metrics(row["path"])
    pd.testing.assert_frame_equal(by_row, by_path)
    assert {"step", "split", "acc", "cum_ideal_macs"} <= set(by_row.columns)
    flops = analysis.load_flops(row)
    assert {"phase", "ideal_macs", "executed_macs", "layer"} <= set(flops.columns)
    assert not analysis.load_masks(row).empty
    assert not analysis.load_adaptation(row).empty


def test_load_blocks_long_format_matches_the_snapshots(runs):
    row = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")].iloc[0]
    blocks = analysis.load_blocks(row)
    assert list(blocks.columns) == ["step", "layer", "block", "frequency", "frozen", "last_score", "changes"]
    assert len(blocks) > 0
    step = int(blocks["step"].iloc[0])
    layer = blocks["layer"].iloc[0]
    with np.load(f"{row['path']}/blocks/step_{step:08d}.npz") as npz:
        expected = np.asarray(npz[f"{layer}.frequency"]).reshape(-1)
    got = blocks[(blocks["step"] == step) & (blocks["layer"] == layer)].sort_values("block")
    np.testing.assert_allclose(got["frequency"].to_numpy(), expected)
    assert blocks["frozen"].dtype == bool
    # restricting to one layer and one step reads only those
    one = analysis.load_blocks(row, layers=[layer], steps=[step])
    assert set(one["layer"]) == {layer} and set(one["step"]) == {step}


def test_methods_without_bame_state_read_as_empty_tables(runs):
    row = runs[runs["method.name"] == "dense"].iloc[0]
    assert analysis.load_adaptation(row).empty
    assert analysis.load_blocks(row).empty
    assert "layer" in analysis.load_adaptation(row).columns


def test_readers_reject_paths_that_are_not_run_folders(tmp_path, runs_root):
    with pytest.raises(analysis.NotARunFolderError, match="does not exist"):
        analysis.load_metrics(tmp_path / "nope")
    with pytest.raises(analysis.NotARunFolderError, match="no manifest.json"):
        analysis.load_flops(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(analysis.NotARunFolderError, match="not a directory"):
        analysis.load_masks(tmp_path / "file.txt")
    # a folder of runs given as one run: the error says so
    with pytest.raises(analysis.NotARunFolderError, match="use load_runs"):
        analysis.load_blocks(runs_root)
    with pytest.raises(analysis.NotARunFolderError, match="'path'"):
        analysis.load_metrics({"run_id": "x"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_runs(tmp_path / "missing")


def test_load_runs_of_an_empty_folder_is_empty_with_the_columns(tmp_path):
    df = analysis.load_runs(tmp_path)
    assert df.empty
    assert {"run_id", "status", "method.name", "top1"} <= set(df.columns)


# --------------------------------------------------------------------------------------------------
# tables


def test_paper_table_mean_and_std_equal_hand_computation(runs):
    table = analysis.paper_table(runs)
    done = runs[runs["status"] == "completed"]
    for _, row in table.iterrows():
        sel = done[done["method.name"] == row["method"]]
        if row["method"] != "dense":
            sel = sel[sel["method.pattern"] == row["pattern"]]
        acc = sel["top1"].to_numpy(float)
        assert row["n_seeds"] == len(sel) == 2
        assert math.isclose(row["top1_mean"], acc.mean(), rel_tol=1e-12)
        assert math.isclose(row["top1_std"], acc.std(ddof=1), rel_tol=1e-9)
        assert math.isclose(row["train_flops"], 2 * sel["ideal_macs"].mean(), rel_tol=1e-12)
        assert math.isclose(row["wall_time_s"], sel["wall_time_s"].mean(), rel_tol=1e-12)
    by = table.set_index("method")
    assert by.loc["dense", "flops_x_dense"] == 1.0
    assert by.loc["srste", "flops_x_srste"] == 1.0
    for method in ("bame", "static", "srste"):
        assert math.isclose(by.loc[method, "flops_x_dense"],
                            by.loc[method, "train_flops"] / by.loc["dense", "train_flops"])
    assert math.isclose(by.loc["bame", "flops_x_srste"], by.loc["bame", "train_flops"] / by.loc["srste", "train_flops"])
    assert math.isnan(by.loc["dense", "flops_x_srste"])  # no SR-STE "at the dense pattern"
    assert "MACs" in table.attrs["caption"] and "2 x MACs" in table.attrs["caption"]
    # order: dense first, bame last
    assert table["method"].iloc[0] == "dense" and table["method"].iloc[-1] == "bame"


def test_paper_table_keeps_runs_with_different_settings_apart(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, method="bame", seed=seed, accs=[0.5, 0.6, 0.7])
        write_run(tmp_path, method="bame", seed=seed + 10, accs=[0.5, 0.6, 0.8],
                  extra_cfg={"method.bame.rho": 0.3})
        write_run(tmp_path, method="dense", seed=seed, accs=[0.5, 0.6, 0.9])
    table = analysis.paper_table(analysis.load_runs(tmp_path))
    assert table.attrs["group_keys"] == ["method.bame.rho"]
    bame = table[table["method"] == "bame"].set_index("method.bame.rho")
    assert bame.loc[0.05, "top1_mean"] == pytest.approx(70.0)
    assert bame.loc[0.3, "top1_mean"] == pytest.approx(80.0)
    # both ablations still find the dense reference
    assert bame["flops_x_dense"].notna().all()


def test_to_markdown_writes_a_table_without_tabulate(runs):
    table = analysis.paper_table(runs)
    md = analysis.to_markdown(table)
    lines = md.strip().splitlines()
    header, sep = lines[0], lines[1]
    assert header.startswith("| ") and "top-1 (%)" in header and "x srste" in header
    assert set(sep.replace("|", "").replace(" ", "")) <= {"-", ":"}
    n_cols = header.count("|")
    body = lines[2:2 + len(table)]
    assert all(line.count("|") == n_cols for line in body)
    bame = table[table["method"] == "bame"].iloc[0]
    assert f"{bame['top1_mean']:.2f} ± {bame['top1_std']:.2f}" in md
    assert "FLOPs = 2 x MACs" in md
    plain = analysis.to_markdown(pd.DataFrame({"a": [1.5, 2.25], "b": ["x|y", "z"]}))
    assert plain.splitlines() == ["|    a | b    |", "| ---: | ---- |", "|  1.5 | x\\|y |", "| 2.25 | z    |"]


def test_published_numbers_are_the_abstract_figures():
    pub = analysis.load_published()
    assert pub["source"].notna().all()
    row = pub.set_index("method").loc[["bame", "srste"]]
    assert list(row["top1"]) == [72.0, 71.5]
    assert set(pub["pattern"]) == {"1:16"} and set(pub["model"]) == {"resnet50"}


# --------------------------------------------------------------------------------------------------
# figures


def _lines_by_gid(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_accuracy_vs_flops_ends_at_each_runs_table_numbers(runs):
    fig = analysis.accuracy_vs_flops(runs)
    assert analysis.has_data(fig)
    lines = _lines_by_gid(fig)
    done = runs[runs["status"] == "completed"]
    for _, row in done.iterrows():
        x, y = lines[row["run_id"]].get_data()
        assert math.isclose(x[-1], row["ideal_flops"], rel_tol=1e-9)
        assert math.isclose(y[-1], row["top1"], rel_tol=1e-9)
    # the mean curve of each group ends at the paper table's mean
    table = analysis.paper_table(runs)
    for _, row in table.iterrows():
        label = "dense" if row["method"] == "dense" else f"{row['method']} {row['pattern']}"
        x, y = lines[f"mean:{label}"].get_data()
        assert math.isclose(y[-1], row["top1_mean"], rel_tol=1e-9)
        assert math.isclose(x[-1], row["train_flops"], rel_tol=1e-9)
    assert fig.axes[0].collections  # std bands


def test_phase_breakdown_bars_add_up_to_the_table_flops(runs):
    fig = analysis.phase_breakdown(runs)
    ax = fig.axes[0]
    assert ax.patches
    heights: dict[str, float] = {}
    phases: dict[str, set] = {}
    for patch in ax.patches:
        group, phase = patch.get_gid().split("|")
        heights[group] = heights.get(group, 0.0) + patch.get_height()
        if patch.get_height() > 0:
            phases.setdefault(group, set()).add(phase)
    table = analysis.paper_table(runs)
    for _, row in table.iterrows():
        label = "dense" if row["method"] == "dense" else f"{row['method']} {row['pattern']}"
        assert math.isclose(heights[label], row["train_flops"], rel_tol=1e-9), label
    bame = next(g for g in phases if g.startswith("bame"))
    assert {"forward", "input_grad", "weight_grad", "adaptation"} <= phases[bame]
    assert "adaptation" not in phases["dense"]


def test_mask_flips_plots_each_sparse_run(runs):
    fig = analysis.mask_flips(runs)
    lines = _lines_by_gid(fig)
    done = runs[runs["status"] == "completed"]
    for _, row in done.iterrows():
        masks = analysis.load_masks(row)
        if row["method.name"] == "dense":
            assert row["run_id"] not in lines
            continue
        expected = masks.groupby("step")["flips"].sum()
        x, y = lines[row["run_id"]].get_data()
        np.testing.assert_array_equal(x, expected.index.to_numpy())
        np.testing.assert_allclose(y, expected.to_numpy(float))
    frac = analysis.mask_flips(runs, value="flip_fraction")
    assert analysis.has_data(frac)
    with pytest.raises(ValueError, match="flip_fraction"):
        analysis.mask_flips(runs, value="nope")


def test_frozen_fraction_is_frozen_over_all_blocks(runs):
    fig = analysis.frozen_fraction(runs)
    lines = _lines_by_gid(fig)
    bame = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")]
    assert len(bame)
    for _, row in bame.iterrows():
        a = analysis.load_adaptation(row).groupby("step")[["frozen_blocks", "num_blocks"]].sum()
        x, y = lines[row["run_id"]].get_data()
        np.testing.assert_array_equal(x, a.index.to_numpy())
        np.testing.assert_allclose(y, (a["frozen_blocks"] / a["num_blocks"]).to_numpy())
    others = runs[runs["method.name"] != "bame"]
    assert not set(others["run_id"]) & set(lines)


def test_oscillation_heatmaps_show_the_block_frequencies(runs):
    row = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")].iloc[0]
    fig = analysis.oscillation_heatmaps(row, max_rows=10**9, sort_blocks=False)
    images = {im.get_gid(): im for ax in fig.axes for im in ax.images}
    blocks = analysis.load_blocks(row)
    assert set(images) == set(blocks["layer"])
    for layer, im in images.items():
        expected = blocks[blocks["layer"] == layer].pivot(index="block", columns="step", values="frequency")
        np.testing.assert_allclose(np.asarray(im.get_array()), expected.to_numpy())
    # binned: each shown row is the mean of its bin, and the overall mean is kept when bins are equal
    small = analysis.oscillation_heatmaps(row, max_rows=2)
    for ax in small.axes:
        for im in ax.images:
            assert np.asarray(im.get_array()).shape[0] <= 2


def test_oscillation_heatmap_falls_back_to_adaptation_csv(tmp_path):
    path = write_run(tmp_path, method="bame")
    for f in (path / "blocks").iterdir():
        f.unlink()
    fig = analysis.oscillation_heatmaps(path)
    (im,) = fig.axes[0].images
    a = analysis.load_adaptation(path)
    assert im.get_gid() == "adaptation.csv:freq_mean"
    assert np.asarray(im.get_array()).shape == (a["layer"].nunique(), a["step"].nunique())


def test_figures_of_no_data_say_so(tmp_path):
    empty = analysis.load_runs(tmp_path)
    for fn in (analysis.accuracy_vs_flops, analysis.mask_flips, analysis.frozen_fraction,
               analysis.phase_breakdown):
        fig = fn(empty)
        assert not analysis.has_data(fig)
        assert fig.axes[0].texts


def test_save_writes_png_and_pdf(runs, tmp_path):
    fig = analysis.accuracy_vs_flops(runs)
    paths = analysis.save(fig, tmp_path / "sub" / "acc")
    assert [p.name for p in paths] == ["acc.png", "acc.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


# --------------------------------------------------------------------------------------------------
# report


def test_write_report_links_existing_figures(runs_root, tmp_path):
    report = analysis.write_report(runs_root, tmp_path / "report", title="Quick comparison")
    text = report.read_text()
    assert report.name == "report.md" and text.startswith("# Quick comparison")
    assert "top-1 (%)" in text and "FLOPs = 2 x MACs" in text
    links = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", text, flags=re.MULTILINE)
    assert len(links) >= 5
    for link in links:
        png = report.parent / link
        assert png.is_file() and png.stat().st_size > 1000, link
        assert png.with_suffix(".pdf").is_file()
    assert "72.0" in text  # published reference
    assert "running" in text  # the unfinished run is listed
