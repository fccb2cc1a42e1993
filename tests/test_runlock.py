"""One writer per run folder: two resumes started together never both write it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import bame
from bame.cli import main
from bame.methods import METHODS
from bame.runs import load_run

from test_train import QUICK, SMALL, _failing, quick

ROOT = QUICK.parents[1]


def test_two_resumes_started_together_write_the_run_once(tmp_path, monkeypatch):
    """The issue's reproduction: interrupt a run, then `bame train --resume RUN & ... & wait`."""
    monkeypatch.setitem(METHODS, "static", _failing(KeyboardInterrupt, at_step=2))
    cfg = quick("method.name=static", "train.checkpoint_every_steps=2", "data.synthetic_train_size=1024",
                "train.log_every_steps=1")
    with pytest.raises(KeyboardInterrupt):
        bame.train(cfg, out_dir=tmp_path, verbose=False)
    (run,) = tmp_path.iterdir()
    assert load_run(run).status == "interrupted"
    target = 40  # long enough that the winner still holds the lock when the other one asks
    cmd = [sys.executable, "-m", "bame", "train", "--resume", str(run), "--no-progress", "--set",
           f"train.max_steps={target}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.communicate()[1], p.pid) for p in procs)
    (ok, _, winner), (refused, err, _) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    assert "Traceback" not in err
    assert f"process {winner} is writing this run folder" in err or "nothing to do" in err, err
    r = load_run(run)
    steps = [int(row["step"]) for row in r.rows("metrics") if row["split"] == "train"]
    assert steps == list(range(1, target + 1))  # every step once
    flops = r.table("flops")
    assert flops["ideal_macs"].sum() == r.summary["flops"]["ideal_macs"]  # not doubled
    assert r.done and r.status == "completed" and len(r.manifest["resumes"]) == 1


def test_a_locked_folder_is_refused_at_once_and_left_alone(tmp_path, capsys):
    from bame.runlock import RunLock

    run = bame.train(quick("method.name=static", "train.max_steps=2"), out_dir=tmp_path, verbose=False).run_dir
    before = (run / "manifest.json").read_bytes()
    with RunLock.acquire(run):  # this test process is "the other writer"
        assert main(["train", "--resume", str(run), "--set", "train.max_steps=4", *SMALL[:1]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bame: error: ") and len(err.splitlines()) == 1
        assert f"process {os.getpid()} is writing this run folder" in err
        assert main(["inspect", str(run)]) == 0  # a reader is never blocked
        assert "status    completed" in capsys.readouterr().out
    assert (run / "manifest.json").read_bytes() == before
