"""method.layer_patterns and scheme files end to end: sparsify.csv, run ids, the ledger, analysis, export,
bame flops, resume, and the one-line errors of the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import analysis
import bame
from bame.cli import main
from bame.config import PatternRule
from bame.contract import run_id
from bame.export import load_export
from bame.flops_report import flops_report
from bame.layers import nm_layers
from bame.runs import find_runs, load_run

from test_train import QUICK, SMALL, _assert_same_run, quick, run

# lenet5: conv1 [6, 1, 5, 5] (stem), conv2 [16, 150] (K=150: no M of 4 or 8 divides it), fc1 [120, 400],
# fc2 [84, 120], classifier [10, 84]; 8 steps of 16 images per epoch
RULES = 'method.layer_patterns=[{match: fc1, pattern: "1:4"}, {match: "re:fc[0-9]|classifier", pattern: "2:8"}]'
EXPECTED = {"fc1": ("1:4", "method.layer_patterns[0]"), "fc2": ("2:8", "method.layer_patterns[1]"),
            "classifier": ("dense", "method.layer_patterns[1]"),  # Cout=10 does not tile by 8
            "conv2": ("dense", "")}
# transposable masks: fc1 at 1:4 by the rule, fc2 at the global 2:4 (its 84 rows tile by 4), blocks of 4 rows
MIXED_T = ["method.mask_structure=transposable", "method.bame.block_rows=4",
           'method.layer_patterns=[{match: fc1, pattern: "1:4"}]']
EXPECTED_T = {"fc1": ("1:4", "method.layer_patterns[0]"), "fc2": ("2:4", ""), "classifier": ("dense", "")}


def _train_cli(out: Path, *sets: str) -> Path:
    before = {r.path for r in find_runs(out)}
    assert main(["train", "--config", str(QUICK), "--out", str(out), "--set", *SMALL, *sets]) == 0
    (new,) = [r.path for r in find_runs(out) if r.path not in before]
    return new


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    for method in ("static", "bame"):
        _train_cli(out, f"method.name={method}", RULES, "method.classifier_dense=false", "train.max_steps=16")
    return out


def _sparsify(run_dir: Path) -> dict[str, dict]:
    return {row["name"]: row for row in load_run(run_dir).rows("sparsify")}


def test_sparsify_csv_says_which_rule_decided_each_layer(mixed_runs):
    for r in find_runs(mixed_runs):
        rows = _sparsify(r.path)
        for name, (pattern, rule) in EXPECTED.items():
            assert (rows[name]["pattern"], rows[name]["rule"]) == (pattern, rule), name
        assert rows["fc1"]["reason"] == "N:M 1:4, method.layer_patterns[0] (match 'fc1')"
        assert "K not divisible by M=8" in rows["classifier"]["reason"]  # row masks: K=84 does not group by 8
        assert rows["conv1"]["reason"] == "first conv, the stem (policy first_conv_dense)"
        model = r.load_checkpoint()["model"]
        assert model["fc1.mask"].float().mean() == 0.25 and model["fc2.mask"].float().mean() == 0.25


def test_run_ids_and_labels_say_mixed(mixed_runs):
    when = __import__("datetime").datetime(2025, 1, 1, 12)
    assert run_id(when, "quick", "bame", "2:4", 0, mixed=True) == "20250101-120000-quick-bame-mixed-s0"
    assert run_id(when, "quick", "bame", "2:4", 0, transposable=True) == "20250101-120000-quick-bame-2of4T-s0"
    assert run_id(when, "quick", "dense", "2:4", 0, mixed=True) == "20250101-120000-quick-dense-s0"
    for r in find_runs(mixed_runs):
        assert r.id.endswith(f"-{r.manifest['method']}-mixed-s0")
        assert r.manifest["pattern"] == "mixed" and r.summary["pattern"] == "mixed"


def test_the_ledger_counts_each_layer_at_its_own_pattern(mixed_runs):
    # per step and layer: nnz(W*m) x positions (16 images; a linear has one position per image)
    closed = {"fc1": 120 * 400 // 4 * 16, "fc2": 84 * 120 * 2 // 8 * 16}
    for r in find_runs(mixed_runs):
        flops = r.table("flops")
        for layer, per_step in closed.items():
            rows = flops[flops["layer"] == layer].groupby("phase")["ideal_macs"].sum()
            assert rows["forward"] == rows["input_grad"] == 16 * per_step, (r.id, layer)
            if r.manifest["method"] == "static":
                assert rows["weight_grad"] == 16 * per_step
            else:  # plus the candidate blocks on BAME's adaptation steps
                assert rows["weight_grad"] > 16 * per_step
        dense = flops[flops["layer"] == "classifier"].groupby("phase")["ideal_macs"].sum()
        assert dense["forward"] == 16 * 10 * 84 * 16


def test_analysis_tables_and_figures_label_the_runs_mixed(mixed_runs, tmp_path):
    runs = analysis.load_runs(mixed_runs)
    table = analysis.paper_table(runs, baseline="static")
    assert sorted(table["pattern"]) == ["mixed", "mixed"] and sorted(table["method"]) == ["bame", "static"]
    points = analysis.run_points(runs)
    assert sorted(points["group"]) == ["bame mixed", "static mixed"]
    assert runs["method.layer_patterns"].iloc[0] == ("{match: fc1, pattern: 1:4}",
                                                      "{match: re:fc[0-9]|classifier, pattern: 2:8}")
    fig = analysis.training_loss(runs)
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")] == ["mixed"]


def test_export_compresses_each_layer_with_its_own_pattern(mixed_runs, tmp_path):
    r = next(r for r in find_runs(mixed_runs) if r.manifest["method"] == "static")
    out = tmp_path / "model.pt"
    assert main(["export", str(r.path), "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    assert exported["pattern"] is None  # the layers differ
    assert {k: v["pattern"] for k, v in exported["nm_layers"].items()} == {"fc1": "1:4", "fc2": "2:8"}
    state, model = load_export(out), r.load_checkpoint()["model"]
    for name in ("fc1", "fc2"):
        assert torch.equal(state[f"{name}.weight"], model[f"{name}.weight"] * model[f"{name}.mask"])


def test_bame_flops_shows_each_layers_pattern(capsys):
    cfg = quick("method.name=bame", RULES, "method.classifier_dense=false")
    rep = flops_report(cfg, measure_batch=1)
    assert rep["pattern"] == "mixed"
    assert {e["layer"]: e["pattern"] for e in rep["layers"]} == {
        "conv1": None, "conv2": None, "fc1": "1:4", "fc2": "2:8", "classifier": None}
    assert main(["flops", "--config", str(QUICK), "--set", "method.name=bame", RULES,
                 "method.mask_structure=transposable", "method.bame.block_rows=8"]) == 0
    text = capsys.readouterr().out
    assert "method bame mixed, transposable masks" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("fc1 ", "fc2 "))}
    assert lines["fc1"][2] == "1:4T" and lines["fc2"][2] == "dense"  # fc2's 84 rows do not tile by 8
    assert lines["fc1"][-1] == "y/y/-"  # N:M along K and along Cout


def test_a_scheme_file_sets_patterns_in_dominosearch_names(tmp_path):
    scheme = tmp_path / "lenet.txt"  # DominoSearch's dict repr: linears counted in module order
    scheme.write_text("{'Linear0_400-120': [1, 4], 'Linear1_120-84': [4, 4]}")
    exp_rules = bame.experiment.build(quick("method.name=static", f"method.layer_pattern_file={scheme}"))
    rows = {d.name: d for d in exp_rules.method.report.layers}
    assert rows["fc1"].pattern == "1:4" and rows["fc1"].rule == "method.layer_pattern_file 'lenet.txt': 'Linear0_400-120'"
    assert rows["fc2"].pattern == "dense" and rows["fc2"].reason.endswith(": dense")
    # an explicit rule comes first and overrides the scheme
    over = bame.experiment.build(quick("method.name=static", f"method.layer_pattern_file={scheme}",
                                       'method.layer_patterns=[{match: fc1, pattern: "2:4"}]'))
    assert dict((n, str(layer.pattern)) for n, layer in nm_layers(over.model)) == {"fc1": "2:4"}


@pytest.mark.parametrize("sets, message", [
    (['method.layer_patterns=[{match: fc1, pattern: 2:4}]'],
     r"method.layer_patterns\[0\]: unquoted N:M pattern read by YAML as the base-60 integer 124: quote it"),
    (['method.layer_patterns=[{match: fc1, pattern: "2:4"}, {mach: fc2, pattern: "2:4"}]'],
     r"method.layer_patterns\[1\]: unknown key 'mach' \(did you mean 'match'\?\)"),
    (['method.layer_patterns=[{match: "re:fc(1", pattern: "2:4"}]'],
     r"method.layer_patterns\[0\]: bad regular expression"),
    (['method.layer_patterns=[{match: fc*, pattern: "2:4"}, {match: fc9, pattern: "1:8"}]'],
     r"method.layer_patterns\[1\] \(match 'fc9'\) decides no layer: it matches no conv/linear module \(conv1, conv2"),
    (['method.layer_patterns=fc1'], r"method.layer_patterns must be a list of rules"),
    (["method.layer_pattern_file=no_such_scheme.yaml"], r"method.layer_pattern_file: scheme file 'no_such_scheme.yaml' "
     r"cannot be read"),
    (["method.mask_structure=transposable"], r"method.bame.block_rows: block_rows=1 is not a multiple of M=4"),
    (["method.mask_structure=transpose"], r"method.mask_structure: 'transpose' is not one of \['row', "
     r"'transposable'\]; did you mean 'transposable'\?"),
])
def test_bad_rules_are_one_line_errors_before_any_run_folder(tmp_path, capsys, sets, message):
    out = tmp_path / "runs"
    assert main(["train", "--config", str(QUICK), "--out", str(out), "--set", *SMALL, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bame: error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2  # 'invalid config:' and the one problem
    assert not out.exists() or not any(out.iterdir())


def test_a_scheme_of_another_model_is_refused_naming_the_key(tmp_path, capsys):
    scheme = tmp_path / "resnet.json"
    scheme.write_text(json.dumps({"SparseConv1_64-64-(3, 3)": [2, 4]}))
    out = tmp_path / "runs"
    assert main(["train", "--config", str(QUICK), "--out", str(out), "--set", *SMALL,
                 f"method.layer_pattern_file={scheme}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "method.layer_pattern_file 'resnet.json': 'SparseConv1_64-64-(3, 3)' is conv #1 in DominoSearch's " \
           "order, but the model's conv #1 'conv2' is 6-16 (5, 5)" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("method", ["bame", "srste"])
def test_resume_is_exact_with_mixed_transposable_masks(tmp_path, capsys, method):
    sets = [f"method.name={method}", *MIXED_T]
    full = run(quick(*sets, "train.max_steps=12"), tmp_path / "full")
    part = run(quick(*sets, "train.max_steps=5"), tmp_path / "part")
    rows = _sparsify(full.run_dir)
    assert {name: (rows[name]["pattern"], rows[name]["rule"]) for name in EXPECTED_T} == EXPECTED_T
    bame.train(resume=part.run_dir, overrides=["train.max_steps=12"], verbose=False, progress=False)
    _assert_same_run(full.run_dir, part.run_dir)
    assert full.run_id.endswith(f"-{method}-mixedT-s0")
    assert main(["inspect", str(full.run_dir)]) == 0
    assert f"/ {method} mixed transposable / seed 0" in capsys.readouterr().out


def test_the_api_takes_rules_and_the_structure_as_config_values(tmp_path):
    cfg = quick("method.name=bame", "method.bame.block_rows=8")
    method = dataclasses.replace(cfg.method, layer_patterns=(PatternRule("fc1", "1:8"), PatternRule("fc2", "dense")),
                                 mask_structure="transposable")
    res = bame.train(dataclasses.replace(cfg, method=method, train=dataclasses.replace(cfg.train, max_steps=4)),
                     out_dir=tmp_path, verbose=False, progress=False)
    assert {name: str(layer.pattern) for name, layer in nm_layers(res.model)} == {"fc1": "1:8"}
    (_, fc1), = nm_layers(res.model)
    assert fc1.transposable and fc1.mask.float().mean() == 1 / 8
    assert res.run_dir.name.endswith("-bame-mixedT-s0")
