"""scripts/vit_table.py: the small-ViT table of docs/results.md, AdamW rows and SGD rows side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_module(REPO / "scripts" / "vit_table.py")


def _run(method: str, pattern: str, optimizer: str, seed: int, top1: float, macs: float) -> dict:
    """A row of analysis.load_runs for the small ViT (the SGD rows change lr, momentum and decay too)."""
    lr = {"adamw": 1e-3, "sgd": 0.05}[optimizer]
    return {"data.name": "fashion-mnist", "model.name": "vit_patch4", "method.name": method,
            "method.pattern": pattern, "train.seed": seed, "train.optimizer": optimizer, "train.lr": lr,
            "status": "completed", "path": f"{method}-{pattern}-{optimizer}-{seed}", "top1": top1,
            "ideal_macs": macs, "executed_macs": 100.0, "wall_time_s": 1.0, "ideal_x_dense": macs / 100.0}


def test_each_row_is_compared_with_dense_and_srste_of_its_own_optimizer(script):
    rows = []
    for seed, d in ((0, 0.0), (1, 2.0)):
        rows += [_run("dense", "dense", "adamw", seed, 80.0 + d, 100.0),
                 _run("srste", "2:4", "adamw", seed, 75.0 + d, 70.0),
                 _run("bame", "2:4", "adamw", seed, 76.0 + d, 56.0),
                 _run("dense", "dense", "sgd", seed, 70.0 + d, 100.0),
                 _run("srste", "2:4", "sgd", seed, 69.0 + d, 70.0)]
    runs = pd.DataFrame(rows)
    lines = script.vit_table(runs).splitlines()
    assert lines[0] == ("| method | pattern | optimizer | seeds | top-1 (%) | vs dense | training FLOPs (ideal) "
                        "| x dense | x SR-STE |")
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:3]): [c.strip() for c in ln.strip("|").split("|")[3:]]
             for ln in lines[2:]}
    assert len(cells) == 5
    assert cells[("dense", "dense", "adamw")][:3] == ["2", "81.00 ± 1.41", "–"]
    assert cells[("srste", "2:4", "adamw")] == ["2", "76.00 ± 1.41", "-5.00", "1.400e+02", "0.700", "1.000"]
    assert cells[("bame", "2:4", "adamw")] == ["2", "77.00 ± 1.41", "-4.00", "1.120e+02", "0.560", "0.800"]
    assert cells[("srste", "2:4", "sgd")][:3] == ["2", "70.00 ± 1.41", "-1.00"]  # against dense SGD, not AdamW


def test_two_runs_of_one_row_and_seed_are_an_error(script, monkeypatch):
    runs = pd.DataFrame([_run("srste", "2:4", "adamw", 0, 75.0, 70.0)] * 2)
    monkeypatch.setattr(script, "load_runs", lambda folder: runs)
    with pytest.raises(SystemExit, match="two runs of one row and seed"):
        script.vit_runs(["runs/vit"])


def test_srste_mask_flips_per_pattern_and_optimizer(script, monkeypatch):
    runs = pd.DataFrame([_run("srste", "2:4", "adamw", 0, 75.0, 70.0), _run("srste", "2:4", "adamw", 1, 75.0, 70.0),
                         _run("srste", "2:4", "sgd", 0, 70.0, 70.0), _run("bame", "2:4", "adamw", 0, 76.0, 56.0)])
    flips = {"srste-2:4-adamw-0": [1_000_000, 500_000], "srste-2:4-adamw-1": [2_000_000, 500_000],
             "srste-2:4-sgd-0": [250_000, 0]}
    monkeypatch.setattr(script, "load_masks", lambda run: pd.DataFrame({"flips": flips[run["path"]]}))
    lines = script.flips_table(runs).splitlines()
    assert lines[0] == "| SR-STE: pattern, optimizer | seeds | mask flips (millions) |"
    assert lines[2:] == ["| 2:4, adamw | 2 | 2.000 ± 0.707 |", "| 2:4, sgd | 1 | 0.250 |"]
