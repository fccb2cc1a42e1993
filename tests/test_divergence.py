"""Diverged runs: stopped as `diverged` (not completed), strict JSON, no export of NaN weights, and
sweeps that report them without retrying."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bame
from bame import loop
from bame.cli import main
from bame.runs import find_runs, load_run

from test_train import QUICK, SMALL, quick

NAN_LR = ["method.name=static", "train.lr=1e6"]


def _strict(path: Path) -> dict:
    def refuse(token: str):
        raise ValueError(f"{path.name}: bare {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_run_whose_loss_goes_nan_stops_as_diverged(tmp_path, capsys):
    argv = ["train", "--config", str(QUICK), "--out", str(tmp_path), "--set", *SMALL, *NAN_LR,
            "train.max_steps=40", "train.nan_patience=4", "train.log_every_steps=1", "train.checkpoint_every_steps=1"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bame: error: run ") and "diverged at step" in err and "last finite loss" in err
    assert "train.nan_patience=4" in err and "lower train.lr" in err
    (run,) = find_runs(tmp_path)
    assert run.status == "diverged" and not run.done
    summary, manifest = _strict(run.path / "summary.json"), _strict(run.path / "manifest.json")
    d = summary["diverged"]
    assert summary["status"] == "diverged" and summary["steps"] == d["step"] < 40
    assert manifest["error"].startswith(f"diverged at step {d['step']}")
    assert d["last_finite_step"] is None or math.isfinite(d["last_finite_loss"])
    assert summary["final"]["train_loss"] is None  # NaN written as null, not as a bare NaN
    assert main(["inspect", str(run.path)]) == 0
    assert "status    diverged" in capsys.readouterr().out
    ckpt = run.load_checkpoint()  # none written once the loss stopped being finite: the last one is usable
    assert ckpt["step"] == manifest["checkpoint_step"] < d["step"] - d["patience"] + 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert main(["export", str(run.path)]) == 0
    assert "is diverged, not completed" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_steps_the_fp16_grad_scaler_skips_are_not_divergence(tmp_path, monkeypatch):
    """A non-finite loss whose step the GradScaler skipped (the weights did not move) is overflow the
    scaler handles; without a scaler the same losses are divergence."""
    real_ce = torch.nn.CrossEntropyLoss

    class Overflowing(real_ce):  # the loss of the first 6 steps overflows
        calls = 0

        def forward(self, out, y):
            Overflowing.calls += 1
            loss = super().forward(out, y)
            return loss * math.inf if Overflowing.calls <= 6 else loss

    monkeypatch.setattr(loop.nn, "CrossEntropyLoss", Overflowing)
    cfg = quick("method.name=static", "train.max_steps=10", "train.nan_patience=3")
    build = loop.Trainer.build

    def with_scaler(self):
        build(self)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    with monkeypatch.context() as mp:
        mp.setattr(loop.Trainer, "build", with_scaler)
        scaled = bame.train(cfg, out_dir=tmp_path / "scaled", verbose=False)
    assert scaled.status == "completed" and load_run(scaled.run_dir).done
    assert load_run(scaled.run_dir).load_checkpoint()["scaler"]["scale"] == 2.0 ** 2  # halved 6 times
    Overflowing.calls = 0
    plain = bame.train(cfg, out_dir=tmp_path / "plain", verbose=False)
    assert plain.status == "diverged" and plain.steps < 10


def test_export_refuses_non_finite_weights(tmp_path, capsys):
    res = bame.train(quick("method.name=static", "train.max_steps=2"), out_dir=tmp_path, verbose=False)
    ckpt_path = res.run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)  # the test's own file
    ckpt["model"]["fc2.weight"][0, 0] = math.nan
    torch.save(ckpt, ckpt_path)
    assert main(["export", str(res.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "refusing to export non-finite weights" in err and "fc2.weight" in err
    assert not (res.run_dir / "export").exists()


def test_a_sweep_reports_diverged_runs_and_does_not_retry_them(tmp_path, capsys):
    argv = ["sweep", "--config", str(QUICK), "--methods", "static,dense", "--out", str(tmp_path), "--no-progress",
            "--set", *SMALL, "train.max_steps=12", "train.nan_patience=3", "train.log_every_steps=1",
            "--variant", "train.lr=1e6"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "2 run, 0 skipped (already completed), 0 failed, 0 diverged" not in out
    assert "0 failed, 2 diverged" in out and "diverged: train.lr=1e6 method.name=static" in out
    assert sorted(r.status for r in find_runs(tmp_path)) == ["diverged", "diverged"]
    assert main(argv) == 1  # again: reported, not trained again
    out = capsys.readouterr().out
    assert "skip train.lr=1e6 method.name=static: diverged in" in out and "--retry-diverged" in out
    assert len(find_runs(tmp_path)) == 2
    assert main([*argv, "--retry-diverged"]) == 1
    assert len(find_runs(tmp_path)) == 4
