"""SIGTERM, SIGUSR1 and Ctrl-C stop a run at the end of a step (checkpoint, interrupted, exit 128 + N); a
killed writer's folder reads as stale and resumes. Each test drives a real `python -m bame train` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bame
from bame.cli import main
from bame.runs import load_run

from test_train import QUICK, SMALL

ROOT = QUICK.parents[1]
# A run far longer than any test waits: 8 steps per epoch, 1000 epochs; a train row every step.
LONG = [*SMALL, "method.name=static", "train.epochs=1000", "train.log_every_steps=1",
        "train.eval_every_epochs=0"]


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bame", "train", "--config", str(QUICK), "--out", str(out), "--no-progress",
           "--set", *LONG, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, out: Path, what, timeout: float = 120.0) -> Path:
    """The run folder once ``what(folder)`` holds (the process still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        folders = [p for p in out.iterdir() if (p / "manifest.json").is_file()] if out.is_dir() else []
        if folders and what(folders[0]):
            return folders[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out: {proc.communicate()}")


def train_rows(run: Path) -> int:
    p = run / "metrics.csv"
    return max(0, len(p.read_text().splitlines()) - 1) if p.is_file() else 0


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGUSR1", "Ctrl-C"])
def test_a_scheduler_signal_checkpoints_the_step_and_marks_the_run_interrupted(tmp_path, capsys, sig, status):
    proc = start_training(tmp_path)
    run = wait_for(proc, tmp_path, lambda r: train_rows(r) >= 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    assert f"stopped by {sig.name}" in stderr and "Traceback" not in stderr
    r = load_run(run)
    m = r.manifest
    assert r.status == "interrupted" and not r.done and m["error"] == sig.name
    steps = [int(row["step"]) for row in r.rows("metrics")]
    ckpt = r.load_checkpoint()
    assert ckpt["step"] == m["checkpoint_step"] == steps[-1] >= 3  # saved at the end of the step it was on
    assert f"bame train --resume {run}" in stdout
    assert main(["inspect", str(run)]) == 0
    assert f"resume    bame train --resume {run}" in capsys.readouterr().out
    res = bame.train(resume=run, overrides=[f"train.max_steps={ckpt['step'] + 2}"], verbose=False, progress=False)
    assert res.status == "completed" and load_run(run).done


def test_a_killed_writer_reads_as_stale_and_its_leftovers_go_on_the_next_open(tmp_path, capsys):
    proc = start_training(tmp_path, "train.checkpoint_every_steps=2")
    run = wait_for(proc, tmp_path, lambda r: (r / "checkpoints" / "last.pt").is_file())
    pid = proc.pid
    proc.kill()  # SIGKILL: no handler runs, the manifest still says running
    proc.communicate()
    leftover = run / "checkpoints" / f".last.pt.tmp-{pid}"
    leftover.write_bytes(b"half a checkpoint")  # what a writer killed inside torch.save leaves
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"status    stale (process {pid} not running)" in out and f"resume    bame train --resume {run}" in out
    assert main(["inspect", str(tmp_path)]) == 0
    assert "stale" in capsys.readouterr().out
    step = load_run(run).load_checkpoint()["step"]
    res = bame.train(resume=run, overrides=[f"train.max_steps={step + 2}"], verbose=False, progress=False)
    assert res.status == "completed" and not leftover.exists()
    assert load_run(run).manifest["resumes"][-1]["removed_temp_files"] == [f"checkpoints/.last.pt.tmp-{pid}"]
