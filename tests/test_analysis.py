"""Tests of analysis/: readers, the paper table, figures and the report, on run folders.

The main fixture makes real run folders with short ``bame train`` runs; a few edge cases (unfinished
runs, a wrong path) use small folders written here by hand following docs/contracts.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import load_module
import yaml

import analysis
from analysis.readers import accuracy_percent
from bame.config import BameConfig

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)  # of the runs of the runs_root fixture (tests/conftest.py) and of the results-tables runs


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
    assert set(runs["status"]) <= {"completed", "running", "failed", "interrupted", "unknown"}
    (partial,) = [r for _, r in runs.iterrows() if r["status"] != "completed"]
    assert partial["status"] == "running" and not partial["done"] and not partial["has_summary"]
    # without summary.json, its numbers so far come from metrics.csv
    metrics = analysis.load_metrics(partial)
    test = metrics[metrics["split"] == "test"]
    assert math.isclose(partial["top1"], 100 * test["acc"].iloc[-1])
    assert partial["ideal_macs"] == metrics["cum_ideal_macs"].iloc[-1]
    assert partial["method.name"] == "bame" and partial["relpath"].startswith("unfinished")


def test_summary_totals_agree_with_the_flops_and_metrics_tables(runs):
    """The three records of a run's FLOPs (summary.json, flops.csv, metrics.csv) say the same."""
    for _, row in runs[runs["status"] == "completed"].iterrows():
        summary = analysis.load_summary(row)
        flops = analysis.load_flops(row)
        assert flops["ideal_macs"].sum() == row["ideal_macs"] == summary["flops"]["ideal_macs"]
        assert flops["executed_macs"].sum() == row["executed_macs"]
        by_phase = analysis.phase_totals(row)
        for phase, macs in summary["flops"]["by_phase"].items():
            assert by_phase[phase] == 2 * macs["ideal_macs"], (row["run_id"], phase)
        assert row["ideal_x_dense"] == pytest.approx(summary["flops"]["ideal_x_dense"])


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
    # the dense run's count is the dense-equivalent count each run's ledger reports
    for method in ("bame", "static", "srste"):
        sel = done[done["method.name"] == method]
        assert by.loc[method, "flops_x_dense"] == pytest.approx(sel["ideal_x_dense"].mean(), rel=1e-9)
    assert "MACs" in table.attrs["caption"] and "2 x MACs" in table.attrs["caption"]
    # order: dense first, bame last
    assert table["method"].iloc[0] == "dense" and table["method"].iloc[-1] == "bame"


def _copy_with(row: pd.Series, dst: Path, **config: object) -> Path:
    """A copy of a real run folder whose config.yaml says ``config`` (dotted keys) instead."""
    path = shutil.copytree(row["path"], dst, ignore=shutil.ignore_patterns("checkpoints", "blocks"))
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    for dotted, value in config.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_paper_table_keeps_runs_with_different_settings_apart(runs, tmp_path):
    done = runs[runs["status"] == "completed"]
    for _, row in done[done["method.name"].isin(["bame", "dense"])].iterrows():
        _copy_with(row, tmp_path / row["run_id"])
        if row["method.name"] == "bame":  # an ablation: same seeds, another rho
            _copy_with(row, tmp_path / (row["run_id"] + "-rho"), **{"method.bame.rho": 0.5})
    table = analysis.paper_table(analysis.load_runs(tmp_path))
    assert table.attrs["group_keys"] == ["method.bame.rho"]
    bame = table[table["method"] == "bame"].set_index("method.bame.rho")
    assert sorted(bame.index) == [0.2, 0.5] and (bame["n_seeds"] == 2).all()
    # both ablations still find the dense reference (a dense run ignores method options)
    assert bame["flops_x_dense"].notna().all()
    assert table[table["method"] == "dense"]["n_seeds"].tolist() == [2]
    md = analysis.to_markdown(table)
    assert "settings" in md.splitlines()[0] and "rho=0.5" in md  # the less common value is named


def test_paper_table_without_a_dense_run_uses_the_ledgers_dense_count(runs):
    full = analysis.paper_table(runs).set_index("method")
    alone = analysis.paper_table(runs[runs["method.name"] != "dense"]).set_index("method")
    assert "dense" not in alone.index
    for method in ("bame", "static", "srste"):
        assert alone.loc[method, "flops_x_dense"] == pytest.approx(full.loc[method, "flops_x_dense"], rel=1e-9)


def test_to_markdown_writes_a_table_without_tabulate(runs):
    table = analysis.paper_table(runs)
    md = analysis.to_markdown(table)
    lines = md.strip().splitlines()
    header, sep = lines[0], lines[1]
    assert header.startswith("| ") and "top-1 (%)" in header and "x SR-STE" in header
    assert set(sep.replace("|", "").replace(" ", "")) <= {"-", ":"}
    n_cols = header.count("|")
    body = lines[2:2 + len(table)]
    assert all(line.count("|") == n_cols for line in body)
    bame = table[table["method"] == "bame"].iloc[0]
    assert f"{bame['top1_mean']:.2f} ± {bame['top1_std']:.2f}" in md
    assert "FLOPs = 2 x MACs" in md
    plain = analysis.to_markdown(pd.DataFrame({"a": [1.5, 2.25], "b": ["x|y", "z"]}))
    assert plain.splitlines() == ["|    a | b    |", "| ---: | ---- |", "|  1.5 | x\\|y |", "| 2.25 | z    |"]


def test_analysis_never_imports_the_training_code():
    """analysis reads run folders through bame's torch-free contract and reader, and nothing else of bame."""
    code = "import sys, analysis; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('bame')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == str(["bame", "bame.contract", "bame.pattern", "bame.runfolder", "bame.runlock"])


def test_published_numbers_are_the_cited_figures():
    pub = analysis.load_published()
    assert pub["source"].notna().all() and (pub["dataset"] == "imagenet").all()
    assert not pub.duplicated(["model", "pattern", "method"]).any()
    at = pub.set_index(["model", "pattern", "method"])["top1"]
    # the BAME abstract (1:16) and the SR-STE authors' released ResNet checkpoints
    assert at[("resnet50", "1:16", "bame")] == 72.0 and at[("resnet50", "1:16", "srste")] == 71.5
    assert [at[("resnet50", p, "srste")] for p in ("2:4", "4:8", "1:4", "2:8")] == [77.0, 77.4, 75.9, 76.4]
    assert at[("resnet18", "dense", "dense")] == 71.3 and at[("resnet18", "2:4", "srste")] == 71.2


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
    for patch in ax.patches:  # horizontal bars: a segment's width is its FLOPs
        group, phase = patch.get_gid().split("|")
        heights[group] = heights.get(group, 0.0) + patch.get_width()
        if patch.get_width() > 0:
            phases.setdefault(group, set()).add(phase)
    table = analysis.paper_table(runs)
    for _, row in table.iterrows():
        label = "dense" if row["method"] == "dense" else f"{row['method']} {row['pattern']}"
        assert math.isclose(heights[label], row["train_flops"], rel_tol=1e-9), label
    bame = next(g for g in phases if g.startswith("bame"))
    assert {"forward", "input_grad", "weight_grad", "adaptation"} <= phases[bame]
    assert "adaptation" not in phases["dense"]


def test_mask_flips_plots_every_step_of_each_sparse_run(runs):
    fig = analysis.mask_flips(runs)
    lines = _lines_by_gid(fig)
    done = runs[runs["status"] == "completed"]
    for _, row in done.iterrows():
        if row["method.name"] == "dense":  # no N:M layers, no flips recorded
            assert row["run_id"] not in lines
            continue
        # masks.csv has rows only for steps that changed a mask: the others are zeros
        masks = analysis.load_masks(row)
        expected = np.zeros(int(row["steps"]))
        for step, flips in masks.groupby("step")["flips"].sum().items():
            expected[step] = flips
        x, y = lines[row["run_id"]].get_data()
        np.testing.assert_array_equal(x, np.arange(int(row["steps"])))
        np.testing.assert_allclose(y, expected)
        if row["method.name"] == "static":
            assert not y.any()
        else:
            assert y.any()
        # the recorder's running count in metrics.csv agrees with masks.csv
        metrics = analysis.load_metrics(row)
        assert metrics["cum_mask_flips"].dropna().iloc[-1] == expected.sum()
    cumulative = _lines_by_gid(analysis.mask_flips(runs, value="cumulative"))
    frac = _lines_by_gid(analysis.mask_flips(runs, value="flip_fraction"))
    srste = done[done["method.name"] == "srste"].iloc[0]
    counts = lines[srste["run_id"]].get_ydata()
    np.testing.assert_allclose(cumulative[srste["run_id"]].get_ydata(), np.cumsum(counts))
    masks = analysis.load_masks(srste)
    n_weights = (masks["flips"] / masks["flip_fraction"]).where(masks["flip_fraction"] > 0).groupby(
        masks["layer"]).max().sum()
    np.testing.assert_allclose(frac[srste["run_id"]].get_ydata(), counts / n_weights)
    with pytest.raises(ValueError, match="flip_fraction"):
        analysis.mask_flips(runs, value="nope")


@pytest.mark.parametrize("value", ["flips", "cumulative", "flip_fraction"])
def test_mask_flip_counts_are_drawn_on_a_linear_axis_from_zero(runs, value):
    ax = analysis.mask_flips(runs, value=value).axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0.0
    assert min(ax.get_yticks()) >= 0  # no negative tick (a symlog axis showed -10^0 for counts)
    assert analysis.mask_flips(runs, value=value, logy=True).axes[0].get_yscale() == "log"


def test_figures_name_groups_by_the_runs_own_group_column(runs):
    done = runs[runs["status"] == "completed"].copy()
    done["group"] = [f"{m} as I call it" for m in done["method.name"]]
    means = {line.get_gid() for line in analysis.mask_flips(done).axes[0].lines}
    assert "mean:srste as I call it" in means and "mean:bame as I call it" in means
    bars = {p.get_gid().split("|")[0] for p in analysis.phase_breakdown(done).axes[0].patches}
    assert bars == set(done["group"])


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


def test_oscillation_heatmap_falls_back_to_adaptation_csv(runs, tmp_path):
    row = runs[(runs["method.name"] == "bame") & (runs["status"] == "completed")].iloc[0]
    path = shutil.copytree(row["path"], tmp_path / "no-snapshots", ignore=shutil.ignore_patterns("blocks"))
    fig = analysis.oscillation_heatmaps(path)
    (im,) = fig.axes[0].images
    a = analysis.load_adaptation(path)
    assert im.get_gid() == "adaptation.csv:freq_mean"
    expected = a.pivot_table(index="layer", columns="step", values="freq_mean", sort=False)
    np.testing.assert_allclose(np.asarray(im.get_array()), expected.to_numpy())


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


def test_comparable_keys_apply_only_where_they_matter_and_ignore_keys_older_runs_lack():
    import pandas as pd

    from analysis.tables import comparable_keys

    runs = pd.DataFrame({
        "data.name": ["d"] * 6, "model.name": ["m"] * 6,
        "method.name": ["bame", "bame", "bame", "static", "static", "dense"],
        "method.pattern": ["1:16"] * 6,
        "method.bame.rho": [0.05, 0.05, 0.2, 0.05, 0.3, 0.05],  # static's value is irrelevant
        "train.new_key": [None, True, True, None, True, None],  # added to the config later
        "method.srste_decay": [2e-4] * 5 + [1.0],  # dense ignores method options
    })
    assert comparable_keys(runs) == ["method.bame.rho"]


# --------------------------------------------------------------------------------------------------
# scripts/results_tables.py (the tables and figures of docs/results.md)

# BAME with the current defaults of its readings (quick.yaml's rho=0.2, T=2 are an ablation reading)
DEFAULT_RHO = BameConfig().rho
BAME_DEFAULTS = (f"method.bame.rho={DEFAULT_RHO}", f"method.bame.interval_steps={BameConfig().interval_steps}")


def _markdown_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first markdown table after ``## heading``."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}, lines[:2]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:]]


def _pm(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_results_tables_script_prints_the_tables_and_saves_the_figures(runs_root, train_quick, tmp_path):
    """The script on real runs: the fixture's 2:4 runs (BAME there with quick.yaml's rho=0.2, T=2, not
    the current defaults; one unfinished run) plus 1:16 runs of static, srste, BAME with the current
    defaults and BAME with quick's reading, 2 seeds each. Every number is checked against the runs'
    summary.json files."""
    root, more = tmp_path / "runs", tmp_path / "more"  # two folders, read together
    shutil.copytree(runs_root, root, ignore=shutil.ignore_patterns("checkpoints", "blocks"))
    for method, extra in (("static", ()), ("srste", ()), ("bame", BAME_DEFAULTS), ("bame", ())):
        for seed in SEEDS:
            out = more if method == "static" else root / "p16"
            train_quick(out, f"method.name={method}", "method.pattern=1:16", f"train.seed={seed}", *extra)
    # the runs, from their own files: (method, pattern, current BAME defaults?) -> [(top-1 %, ideal FLOPs)]
    groups: dict[tuple, list[tuple[float, int]]] = {}
    swaps: dict[tuple, list[int]] = {}  # BAME's runs at 1:16: kept weights swapped over the run
    for summary_path in sorted([*root.rglob("summary.json"), *more.rglob("summary.json")]):
        summary = json.loads(summary_path.read_text())
        rho = yaml.safe_load((summary_path.parent / "config.yaml").read_text())["method"]["bame"]["rho"]
        key = (summary["method"], summary["pattern"], summary["method"] != "bame" or rho == DEFAULT_RHO)
        groups.setdefault(key, []).append((100 * summary["final"]["test_acc"], summary["flops"]["ideal_flops"]))
        if key[:2] == ("bame", "1:16"):
            adaptation = pd.read_csv(summary_path.parent / "adaptation.csv")
            swaps.setdefault(key, []).append(int(adaptation["swaps"].sum()))
    assert len(groups) == 8 and all(len(v) == 2 for v in groups.values())  # the unfinished run has no summary
    # a reading of the learning-block family: not one of the first family's readings, so left out
    train_quick(more, "method.name=bame", "method.pattern=1:16", *BAME_DEFAULTS, "method.bame.designated_grad=window",
                "method.bame.pruned_update=train", "method.bame.designation=progressive")

    figures = tmp_path / "figures"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "results_tables.py"), str(root), str(more),
                           "--figures", str(figures)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "FLOPs = 2 x MACs" in out

    # the figures it says it saves, as real PNGs and PDFs
    stems = ("study_accuracy_vs_flops", "study_phase_breakdown", "study_ablation_1of16")
    for stem in stems:
        png = figures / f"{stem}.png"
        assert png.is_file() and png.stat().st_size > 1000, stem
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (figures / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{s}.{x}" for s in stems for x in ("png", "pdf"))

    def top1(key):
        return [t for t, _ in groups[key]]

    # ablation at 1:16: static, srste, then each BAME reading (best first) against the static control
    ablation = _markdown_rows(out, "Readings of BAME at 1:16")
    static = np.mean(top1(("static", "1:16", True)))
    assert [r[:2] for r in ablation[:2]] == [["static", "fixed magnitude mask"], ["srste", "dense backward"]]
    # labels name what differs from the table's reference reading (method.md's lma=taylor, rho=0.05)
    first = {"lma": "taylor", "rho": 0.05}
    default_label = ", ".join(f"{k}={getattr(BameConfig(), k)}" for k in first if getattr(BameConfig(), k) != first[k])
    readings = {default_label: ("bame", "1:16", True),
                "lma=gradient, rho=0.2, interval_steps=2": ("bame", "1:16", False)}
    assert [r[0] for r in ablation[2:]] == ["bame", "bame"] and {r[1] for r in ablation[2:]} == set(readings)
    means = [float(r[3].split(" ± ")[0]) for r in ablation[2:]]
    assert means == sorted(means, reverse=True)
    for row in ablation:
        key = readings.get(row[1], (row[0], "1:16", True))
        assert row[2:] == ["2", _pm(top1(key)), f"{np.mean(top1(key)) - static:+.2f}"], row

    # what each reading's adaptation steps did: swaps over the run, from adaptation.csv
    changes = {r[0]: r[1:] for r in _markdown_rows(out, "What the readings' adaptation steps did (mean over seeds [min, max])")}
    assert set(changes) == set(readings)
    for label, key in readings.items():
        assert changes[label][:2] == ["2", f"{np.mean(swaps[key]):.0f} [{min(swaps[key])}, {max(swaps[key])}]"], label

    # methods x patterns with the current defaults: BAME 2:4 (quick's reading) and the unfinished run left out
    methods = _markdown_rows(out, "Methods x patterns (current defaults)")
    expected = [("dense", "2:4"), ("static", "2:4"), ("srste", "2:4"),
                ("static", "1:16"), ("srste", "1:16"), ("bame", "1:16")]
    assert sorted((r[0], r[1]) for r in methods) == sorted((m, "dense" if m == "dense" else p) for m, p in expected)
    dense_flops = np.mean([f for _, f in groups[("dense", "2:4", True)]])
    for row in methods:
        key = (row[0], "2:4" if row[1] == "dense" else row[1], True)
        flops = np.mean([f for _, f in groups[key]])
        srste = np.mean([f for _, f in groups[("srste", key[1], True)]])
        assert row[2:6] == ["2", _pm(top1(key)), f"{flops:.3e}", f"{flops / dense_flops:.3f}"], row
        assert row[6] == ("–" if row[0] == "dense" else f"{flops / srste:.3f}"), row


def test_results_tables_fill_options_older_runs_lack_with_their_default():
    """A run from before ``score_steps`` existed ran what its default (1) does: it groups with the new runs
    at 1, not as a separate 'nan' reading, and stays among the current defaults."""
    tables = load_module(REPO / "scripts" / "results_tables.py")
    runs = pd.DataFrame({"method.name": ["bame", "bame"], "method.bame.score_steps": [np.nan, 3.0]})
    filled = tables.with_new_options(runs)
    assert filled["method.bame.score_steps"].tolist() == [BameConfig().score_steps, 3]
    assert [type(v) for v in filled["method.bame.score_steps"]] == [int, int]  # labelled 'score_steps=3', not '3.0'
    assert filled["method.bame.rho"].tolist() == [BameConfig().rho] * 2  # a column missing altogether
