"""scripts/methods_table.py: which runs make the methods table of docs/results.md, and the table itself."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_module(REPO / "scripts" / "methods_table.py")


def _run(reference: dict, method: str, pattern: str, seed: int, top1: float, macs: float, **changes) -> dict:
    """A row of analysis.load_runs: the study config with ``changes`` (dotted keys with '__' for '.')."""
    row = dict(reference)
    row.update({k.replace("__", "."): v for k, v in changes.items()})
    row.update({"method.name": method, "method.pattern": pattern, "train.seed": seed, "status": "completed",
                "path": f"{method}-{pattern}-{seed}", "top1": top1, "ideal_macs": macs, "executed_macs": macs,
                "wall_time_s": 1.0, "ideal_x_dense": 0.5})
    return row


def test_the_table_keeps_the_study_runs_and_the_transposable_variant(script):
    reference = script.study_reference()
    assert reference["method.mask_structure"] == "row" and reference["train.epochs"] == 3
    old = {k: v for k, v in reference.items() if k != "method.bimask.greedy_num"}  # a folder from before it existed
    rows = []
    for seed, top1 in ((0, 80.0), (1, 82.0)):
        rows += [_run(reference, "srste", "2:4", seed, top1 + 5, 100.0),
                 _run(reference, "static", "2:4", seed, top1 + 4, 50.0),
                 _run(reference, "bimask", "2:4", seed, top1 + 3, 70.0),
                 _run(old, "bimask", "1:16", seed, top1 + 1, 60.0),
                 _run(reference, "lbc", "2:4", seed, top1, 80.0, method__bame__rho=0.3),  # another method's option
                 _run(reference, "static", "2:4", seed, top1 + 2, 50.0, method__mask_structure="transposable"),
                 _run(reference, "bame", "2:4", seed, top1 + 1, 55.0, method__mask_structure="transposable",
                      method__bame__block_rows=4)]
        rows += [_run(reference, "bame", "2:4", seed, 10.0, 1.0, method__bame__rho=0.3),  # an ablation reading
                 _run(reference, "bame", "2:4", seed, 10.0, 1.0, method__bame__block_rows=4),  # row: not a variant
                 _run(reference, "static", "2:4", seed, 10.0, 1.0, train__epochs=10),
                 _run(reference, "static", "1:4", seed, 10.0, 1.0),
                 _run(reference, "dense", "2:4", seed, 10.0, 1.0),
                 dict(_run(reference, "static", "1:16", seed, 10.0, 1.0), status="running")]
    runs = pd.DataFrame(rows)
    runs.loc[runs["path"] == "bimask-1:16-0", "method.bimask.greedy_num"] = float("nan")
    kept = script.select(runs, reference)
    assert len(kept) == 14 and (kept["top1"] > 10).all()

    lines = script.methods_table(kept).splitlines()
    assert lines[0] == "| method | pattern | settings | seeds | top-1 (%) | training FLOPs (ideal) | x SR-STE |"
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:3]): [c.strip() for c in ln.strip("|").split("|")[3:]]
             for ln in lines[2:]}
    assert cells[("static", "2:4", "")] == ["2", "85.00 ± 1.41", "1.000e+02", "0.500"]
    assert cells[("static", "2:4", "mask_structure=transposable")] == ["2", "83.00 ± 1.41", "1.000e+02", "0.500"]
    assert cells[("bame", "2:4", "mask_structure=transposable, block_rows=4")][:2] == ["2", "82.00 ± 1.41"]
    assert cells[("bimask", "1:16", "")] == ["2", "82.00 ± 1.41", "1.200e+02", "–"]  # no SR-STE at 1:16 here
    assert cells[("lbc", "2:4", "")][1:] == ["81.00 ± 1.41", "1.600e+02", "0.800"]
    assert len(cells) == 7  # srste, static, bimask (2 patterns), lbc, and the transposable static and bame

    twice = pd.concat([runs, runs.iloc[[0]].assign(path="again")], ignore_index=True)
    with pytest.raises(SystemExit, match="two runs of one row and seed: srste-2:4-0, again"):
        script.select(twice, reference)
