"""The demo end to end on the real Fashion-MNIST files (`make test` fetches them), cut to a few steps."""

from pathlib import Path

from bame.cli import main
from bame.demo import DEMO_RUNS

TINY = ["train.max_steps=2", "data.train_subset=512", "data.test_subset=100", "train.eval_batch_size=100"]


def test_demo_trains_every_run_writes_the_report_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--set", *TINY]) == 0
    first = capsys.readouterr().out
    runs = sorted(p for p in out.iterdir() if (p / "DONE").exists())
    assert len(runs) == len(DEMO_RUNS)
    report = (out / "report.md").read_text()
    methods = report.split("## Methods\n", 1)[1].strip().split("\n\n", 1)[0]
    table_rows = methods.splitlines()[2:]
    assert len(table_rows) == len(DEMO_RUNS)  # one row per (method, pattern)
    for label, _ in DEMO_RUNS:
        method, _, pattern = label.partition(" ")
        assert any(row.startswith(f"| {method} ") and f"| {pattern or 'dense'} " in row for row in table_rows), label
    assert "FLOPs = 2 x MACs" in report
    printed = [line for line in first.splitlines() if line.startswith("| ")]
    assert len(printed) == 2 + len(DEMO_RUNS)  # header, separator, one row per (method, pattern)
    figures = [line.split("](")[1].rstrip(" )") for line in report.splitlines() if line.startswith("![")]
    assert figures and all((out / Path(f)).is_file() for f in figures)

    # Running it again trains nothing new and rebuilds the report from the same runs.
    assert main(["demo", "--out", str(out), "--no-progress", "--set", *TINY]) == 0
    second = capsys.readouterr().out
    assert second.count("reusing") == len(DEMO_RUNS)
    assert sorted(p for p in out.iterdir() if (p / "DONE").exists()) == runs


def test_demo_rejects_a_bad_override_before_training(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", "train.epoch=1"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
