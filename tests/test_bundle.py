"""bame bundle: a results bundle reads like the run folders it came from (the same tables and figures), keeps
what the figures need of the block state, holds no checkpoint, and never replaces what it did not write."""

from __future__ import annotations

import hashlib
import json
import shutil

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import analysis
from bame.bundle import INDEX, README, kept_snapshots, write_bundle
from bame.cli import main

TABLE_LOADERS = (analysis.load_metrics, analysis.load_flops, analysis.load_masks, analysis.load_adaptation,
                 analysis.load_sparsify)


@pytest.fixture(scope="module")
def bundled(runs_root, tmp_path_factory):
    """The finished quick runs of the ``runs_root`` fixture, bundled (the unfinished one left out)."""
    out = tmp_path_factory.mktemp("bundle") / "study"
    assert main(["bundle", str(runs_root / "quick"), str(out), "--title", "Quick runs"]) == 0
    return out


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels


def _same_figure(make, a, b) -> None:
    assert np.array_equal(_pixels(make(a)), _pixels(make(b)))


def _runs(root) -> pd.DataFrame:
    runs = analysis.load_runs(root)
    runs = runs[runs["status"] == "completed"].copy()
    runs["group"] = analysis.run_groups(runs)
    return runs


def test_a_bundled_study_gives_the_tables_and_figures_of_its_folders(runs_root, bundled):
    folder, bundle = _runs(runs_root / "quick"), _runs(bundled / "quick")
    assert len(folder) == 8
    where = ["path", "relpath"]
    pd.testing.assert_frame_equal(folder.drop(columns=where), bundle.drop(columns=where))
    for (_, a), (_, b) in zip(folder.iterrows(), bundle.iterrows()):
        assert a["run_id"] == b["run_id"]
        for load in TABLE_LOADERS:
            pd.testing.assert_frame_equal(load(a), load(b))
        assert analysis.load_summary(a) == analysis.load_summary(b)
        assert analysis.load_config(a) == analysis.load_config(b)
    pd.testing.assert_frame_equal(analysis.paper_table(folder), analysis.paper_table(bundle))
    pd.testing.assert_frame_equal(analysis.phase_table(folder), analysis.phase_table(bundle))
    pd.testing.assert_frame_equal(analysis.mask_stats(folder), analysis.mask_stats(bundle))
    for make in (analysis.accuracy_vs_flops, analysis.mask_flips, analysis.frozen_fraction, analysis.phase_breakdown,
                 analysis.layer_flips, lambda r: analysis.pareto_scatter(analysis.run_points(r))):
        _same_figure(make, folder, bundle)
    bame_runs = [(a, b) for (_, a), (_, b) in zip(folder.iterrows(), bundle.iterrows()) if a["method.name"] == "bame"]
    assert bame_runs
    for a, b in bame_runs:
        assert len(analysis.load_block_arrays(a)) and len(analysis.load_block_arrays(b, fields=("frequency",)))
        _same_figure(analysis.oscillation_heatmaps, a, b)
        step_a, table_a = analysis.block_summary(a)
        step_b, table_b = analysis.block_summary(b)
        assert step_a == step_b
        pd.testing.assert_frame_equal(table_a, table_b)


def test_the_bundle_holds_the_compact_files_and_says_what_it_holds(runs_root, bundled):
    files = sorted(p.relative_to(bundled).as_posix() for p in bundled.rglob("*") if p.is_file())
    assert not [f for f in files if "checkpoint" in f or f.endswith((".pt", ".lock"))]
    run = next(p for p in (bundled / "quick").iterdir() if "-bame-" in p.name)
    assert sorted(p.name for p in run.iterdir()) == [
        "DONE", "adaptation.csv.gz", "blocks", "config.yaml", "flops.csv.gz", "manifest.json", "masks.csv.gz",
        "metrics.csv.gz", "sparsify.csv.gz", "summary.json"]
    source = runs_root / "quick" / run.name
    for name in ("manifest.json", "config.yaml", "summary.json", "DONE"):
        assert (run / name).read_bytes() == (source / name).read_bytes()
    index = json.loads((bundled / INDEX).read_text())
    listed = index["files"]
    assert sorted(listed) == [f for f in files if f != INDEX]
    assert all(hashlib.sha256((bundled / f).read_bytes()).hexdigest() == sha for f, sha in listed.items())
    readme = (bundled / README).read_text()
    size = sum((bundled / f).stat().st_size for f in listed if f != README)
    assert readme.startswith("# Quick runs\n") and index["bytes"] == size
    assert f"{size / 1e6:.2f} MB in {len(listed) - 1} files" in readme
    assert "`bame bundle " in readme and "--title 'Quick runs'" in readme  # the command that wrote it
    assert "bame train --config" in readme  # ... and the commands that produced the runs
    assert readme.count("| `quick/") == 8


def test_snapshots_are_thinned_to_the_first_the_last_and_evenly_between(runs_root, tmp_path):
    assert kept_snapshots(3, 12) == [0, 1, 2]
    assert kept_snapshots(176, 12) == [0, 16, 32, 48, 64, 80, 95, 111, 127, 143, 159, 175]
    assert kept_snapshots(5, 2) == [0, 4] and kept_snapshots(5, 1) == [4] and kept_snapshots(5, 0) == []
    real = next(p for p in sorted((runs_root / "quick").iterdir()) if "-bame-" in p.name)
    source = tmp_path / "study" / real.name
    shutil.copytree(real, source, ignore=shutil.ignore_patterns("checkpoints"))
    for step in (4, 6, 8):  # five snapshots in all (the quick run adapted twice)
        shutil.copyfile(source / "blocks" / "step_00000002.npz", source / "blocks" / f"step_{step:08d}.npz")
    write_bundle([source.parent], tmp_path / "b", snapshots=3)
    run = tmp_path / "b" / "study" / source.name
    steps = [p.name for p in sorted((source / "blocks").iterdir())]
    assert len(steps) == 5
    assert sorted(p.name for p in (run / "blocks").iterdir()) == [steps[0], steps[2], steps[4]]
    assert (run / "blocks" / steps[-1]).read_bytes() == (source / "blocks" / steps[-1]).read_bytes()
    for thinned in (steps[0], steps[2]):
        with np.load(run / "blocks" / thinned) as thin, np.load(source / "blocks" / thinned) as full:
            assert sorted(thin.files) == sorted(k for k in full.files if not k.endswith(".last_score"))
            assert all(np.array_equal(thin[k], full[k]) for k in thin.files)
    assert analysis.block_summary(run)[0] == analysis.block_summary(source)[0] == 8
    heat = analysis.load_block_arrays(run, fields=("frequency",))
    assert heat and all(list(a["step"]) == [0, 4, 8] for a in heat.values())
    assert json.loads((tmp_path / "b" / INDEX).read_text())["runs"][0]["snapshots_total"] == 5


def test_unfinished_runs_are_refused_unless_asked(runs_root, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bundle", str(runs_root), str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 run folder(s) are not finished" in err and "partial" in err and "--unfinished skip" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["bundle", str(runs_root), str(out), "--unfinished", "skip"]) == 0
    assert len(analysis.load_runs(out)) == 8 and "1 unfinished run(s) left out" in (out / README).read_text()
    assert main(["bundle", str(runs_root), str(out), "--unfinished", "include"]) == 0
    runs = analysis.load_runs(out)
    assert len(runs) == 9 and (runs["status"] == "running").sum() == 1


def _bundle(src, out) -> int:
    return main(["bundle", str(src), str(out)])


def test_it_replaces_only_a_bundle_it_wrote_unchanged(runs_root, tmp_path, capsys):
    src = tmp_path / "study"
    shutil.copytree(runs_root / "quick", src, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert _bundle(src, out) == 2
    assert "not written by bame bundle" in capsys.readouterr().err and (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    assert _bundle(src, out) == 0  # an empty folder is fine

    (out / "study" / "extra.txt").write_text("mine")
    assert _bundle(src, out) == 2
    assert "extra.txt" in capsys.readouterr().err and (out / "study" / "extra.txt").read_text() == "mine"
    (out / "study" / "extra.txt").unlink()

    readme = out / README
    readme.write_text(readme.read_text() + "\nmy note\n")
    assert _bundle(src, out) == 2
    assert "changed since bame bundle wrote them (README.md)" in capsys.readouterr().err
    assert readme.read_text().endswith("my note\n")
    readme.write_text(readme.read_text().removesuffix("\nmy note\n"))

    gone = next(p for p in sorted(src.iterdir()) if "-dense-" in p.name)
    shutil.rmtree(gone)
    assert _bundle(src, out) == 0  # its own bundle, unchanged: replaced whole
    assert not (out / "study" / gone.name).exists() and len(analysis.load_runs(out)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "study"]  # no temporary folder left


def test_bad_arguments_get_one_line_before_anything_is_written(runs_root, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "out")], "needs a folder of runs and the bundle's folder"),
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "is not a folder of runs"),
        ([str(runs_root / "quick"), str(runs_root / "quick" / "bundle")], "lies inside the runs folder"),
        ([str(tmp_path / "quick"), str(tmp_path / "out")], "holds no run folder"),
        ([str(runs_root / "quick"), str(tmp_path / "quick"), str(tmp_path / "out")], "would both be bundled as quick/"),
        ([str(runs_root / "quick"), str(tmp_path / "out"), "--snapshots", "-1"], "--snapshots must be >= 0"),
    ]
    (tmp_path / "quick").mkdir()
    for argv, message in cases:
        assert main(["bundle", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (runs_root / "quick" / "bundle").exists()
