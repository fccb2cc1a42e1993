"""The run folder: unique ids, manifest first, atomic files, tables, endings, the reader."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from bame import runs as runs_mod
from bame.config import Config, from_dict, load_config
from bame.runs import NullWriter, RunNotFoundError, RunWriter, find_runs, load_run, make_run_id


def _cfg(**train) -> Config:
    return from_dict({"name": "unit test", "method": {"name": "srste", "pattern": "1:16"}, "train": train})


def test_run_id_names_config_method_pattern_seed():
    rid = make_run_id(_cfg(seed=3))
    stamp, rest = rid[:15], rid[16:]
    assert stamp[8] == "-" and stamp.replace("-", "").isdigit()
    assert rest == "unit_test-srste-1of16-s3"  # no ':' or spaces in folder names


def test_a_dense_run_id_names_no_pattern():
    cfg = from_dict({"name": "demo", "method": {"name": "dense", "pattern": "1:4"}})
    assert make_run_id(cfg)[16:] == "demo-dense-s0"


def test_json_files_are_strict(tmp_path):
    w = RunWriter.create(tmp_path, _cfg())
    w.write_json("summary.json", {"loss": float("nan"), "best": [float("inf"), 1.5], "t": torch.tensor(float("-inf"))})

    def refuse(token):
        raise ValueError(token)

    assert json.loads((w.path / "summary.json").read_text(), parse_constant=refuse) == {
        "loss": None, "best": [None, 1.5], "t": None}


def test_ids_are_never_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(runs_mod, "make_run_id", lambda cfg, when=None: "fixed-id")
    (tmp_path / "fixed-id").mkdir()  # a folder someone already has
    (tmp_path / "fixed-id" / "mine.txt").write_text("keep me")
    writers = [RunWriter.create(tmp_path, _cfg()) for _ in range(3)]
    assert [w.id for w in writers] == ["fixed-id-2", "fixed-id-3", "fixed-id-4"]
    assert (tmp_path / "fixed-id" / "mine.txt").read_text() == "keep me"


def test_create_writes_manifest_and_resolved_config(tmp_path):
    cfg = _cfg(seed=7)
    w = RunWriter.create(tmp_path, cfg, command=["bame", "train"], device="cpu")
    m = json.loads((w.path / "manifest.json").read_text())
    assert m["status"] == "running" and m["id"] == w.id and m["command"] == ["bame", "train"]
    assert m["seeds"] == {"train.seed": 7} and m["device"] == "cpu"
    for key in ("python", "torch", "torchvision", "bame"):
        assert m["versions"][key]
    assert set(m["git"]) == {"commit", "dirty", "diff_sha256", "untracked"}
    if m["git"]["dirty"]:
        assert len(m["git"]["diff_sha256"]) == 64
    # config.yaml holds every default and loads back to the same config (patterns stay strings)
    assert load_config(w.path / "config.yaml") == cfg
    assert "'1:16'" in (w.path / "config.yaml").read_text()
    assert load_run(w.path).config == cfg
    assert not (w.path / "DONE").exists()


def test_tables_append_widen_and_truncate(tmp_path):
    w = RunWriter.create(tmp_path, _cfg())
    w.append("metrics", {"step": 1, "loss": 0.5})
    w.append("metrics", {"step": 2, "loss": 0.25, "extra": True})  # a new key widens the header
    w.append("metrics", {"step": 3})
    with open(w.path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"step": "1", "loss": "0.5", "extra": ""}, {"step": "2", "loss": "0.25", "extra": "True"},
                    {"step": "3", "loss": "", "extra": ""}]
    assert w.table_rows() == {"metrics": 3}
    w.append("masks", {"step": 3, "layer": "a"})
    dropped = w.truncate_tables({"metrics": 1})
    assert dropped == {"metrics": 2, "masks": 1}
    assert [r["step"] for r in load_run(w.path).rows("metrics")] == ["1"]
    assert load_run(w.path).rows("masks") == []
    w.append("metrics", {"step": 2, "loss": 1e-3})  # appending after a truncation keeps the header
    assert load_run(w.path).table("metrics")["step"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        w.append("../escape", {"a": 1})


def test_float_cells_round_trip_exactly(tmp_path):
    w = RunWriter.create(tmp_path, _cfg())
    x = 0.1 + 0.2
    w.append("t", {"x": x, "y": np.float32(1.5), "z": torch.tensor(3)})
    row = load_run(w.path).rows("t")[0]
    assert float(row["x"]) == x and row["y"] == "1.5" and row["z"] == "3"


def test_save_arrays_and_checkpoint_are_atomic_files(tmp_path):
    w = RunWriter.create(tmp_path, _cfg())
    w.save_arrays("step_00000004", {"fc.frequency": torch.arange(4.0), "fc.frozen": np.array([True, False])})
    arrays = load_run(w.path).arrays("step_00000004")
    assert arrays["fc.frequency"].tolist() == [0, 1, 2, 3] and arrays["fc.frozen"].dtype == bool
    w.save_checkpoint({"model": {"w": torch.ones(2)}, "step": 4})
    assert load_run(w.path).load_checkpoint()["step"] == 4
    assert not list(w.path.rglob(".*tmp*"))  # no temporary files left behind


def test_endings(tmp_path):
    done = RunWriter.create(tmp_path, _cfg())
    done.complete({"final": {"test_acc": 0.5}})
    r = load_run(done.path)
    assert r.status == "completed" and r.done and r.summary["final"]["test_acc"] == 0.5
    assert r.manifest["finished"]

    failed = RunWriter.create(tmp_path, _cfg())
    failed.fail(RuntimeError("boom"), "Traceback ...")
    r = load_run(failed.path)
    assert r.status == "failed" and not r.done and r.manifest["error"] == "RuntimeError: boom"

    stopped = RunWriter.create(tmp_path, _cfg())
    stopped.interrupt()
    r = load_run(stopped.path)
    assert r.status == "interrupted" and not r.done
    assert [x.id for x in find_runs(tmp_path)] == sorted([done.id, failed.id, stopped.id])


def test_reopen_for_resume(tmp_path):
    from bame.runlock import RunLock

    w = RunWriter.create(tmp_path, _cfg())
    w.interrupt()
    w.release()
    with RunLock.acquire(w.path) as lock:
        again = RunWriter.reopen(w.path, lock, command=["bame", "train", "--resume", str(w.path)], from_step=5)
        r = load_run(w.path)
        assert r.status == "running" and not r.done
        entry = r.manifest["resumes"][0]
        assert entry["from_step"] == 5 and entry["previous_status"] == "interrupted" and entry["status"] == "running"
        assert again.id == w.id


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="not a run folder"):
        load_run(tmp_path / "empty")
    w = RunWriter.create(tmp_path, _cfg())
    with pytest.raises(RunNotFoundError, match="no checkpoint"):
        load_run(w.path).load_checkpoint()


def test_null_writer_writes_nothing(tmp_path):
    w = NullWriter()
    w.append("metrics", {"a": 1})
    w.save_arrays("x", {})
    w.complete({})
    assert w.path is None and w.id is None
