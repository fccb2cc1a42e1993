"""``bame report DIR``: the tables checked against the runs' own summary.json files, the figures it links,
each group's runs and commands, HTML, and the one-line errors for bad input (nothing written then)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bame.cli import main
from bame.config import BameConfig


@pytest.fixture(scope="module")
def report_runs(runs_root, train_quick, tmp_path_factory):
    """The shared runs (2:4: dense, static, srste, BAME at quick.yaml's reading, 2 seeds; one unfinished,
    in nested folders) and BAME at another reading (lma=taylor), 2 seeds, in a folder of its own."""
    root = tmp_path_factory.mktemp("report") / "runs"
    shutil.copytree(runs_root, root, ignore=shutil.ignore_patterns("checkpoints"))
    for seed in (0, 1):
        train_quick(root / "taylor", "method.name=bame", "method.bame.lma=taylor", f"train.seed={seed}")
    return root


def _groups(root: Path) -> dict[tuple, list[dict]]:
    """(method, pattern, lma) -> the summary.json of each completed run of that group."""
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        lma = config["method"]["bame"]["lma"] if summary["method"] == "bame" else None
        pattern = "dense" if summary["method"] == "dense" else summary["pattern"]
        summary["run_id"] = path.parent.name
        groups.setdefault((summary["method"], pattern, lma), []).append(summary)
    return groups


def _table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first markdown table after ``## heading``, as {header: cell}."""
    section = text.split(f"## {heading}\n", 1)[1]
    lines = [ln for ln in section.strip().split("\n\n", 1)[0].splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _pm(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_report_tables_are_the_runs_summaries(report_runs, capsys):
    assert main(["report", str(report_runs)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == report_runs / "report.md"
    text = path.read_text()
    groups = _groups(report_runs)
    assert len(groups) == 5 and all(len(runs) == 2 for runs in groups.values())

    # methods: one row per group, mean ± std over seeds, FLOPs and their ratios from summary.json
    # (settings name the one option that varies, lma, where it is not the current default)
    rows = _table(text, "Methods")
    assert BameConfig().lma == "gradient" and "`method.bame.lma`" in text
    assert len(rows) == len(groups)
    flops = {key: np.mean([s["flops"]["ideal_flops"] for s in runs]) for key, runs in groups.items()}
    for row in rows:
        lma = ("taylor" if "lma=taylor" in row["settings"] else "gradient") if row["method"] == "bame" else None
        key = (row["method"], row["pattern"], lma)
        runs = groups[key]
        assert row["settings"] == ("lma=taylor" if lma == "taylor" else ""), row
        assert row["seeds"] == "2"
        assert row["top-1 (%)"] == _pm([100 * s["final"]["test_acc"] for s in runs])
        assert row["training FLOPs (ideal)"] == f"{flops[key]:.3e}"
        assert row["x dense"] == f"{flops[key] / flops[('dense', 'dense', None)]:.3f}"
        srste = flops[("srste", "2:4", None)]
        assert row["x SR-STE"] == ("–" if row["method"] == "dense" else f"{flops[key] / srste:.3f}")
        assert row["training FLOPs (executed)"] == f"{np.mean([s['flops']['executed_flops'] for s in runs]):.3e}"

    # readings against the static control: static first, then the single baselines, then BAME best first
    readings = _table(text, "Readings against the static control")
    static = np.mean([100 * s["final"]["test_acc"] for s in groups[("static", "2:4", None)]])
    assert [r["method"] for r in readings[:2]] == ["static", "srste"]  # dense is no 2:4 experiment
    assert readings[0]["settings"] == "fixed magnitude mask" and readings[0]["vs static"] == "+0.00"
    bame = readings[2:]
    assert [r["method"] for r in bame] == ["bame", "bame"]
    means = [float(r["top-1 (%)"].split(" ± ")[0]) for r in bame]
    assert means == sorted(means, reverse=True)
    for row in readings:
        lma = ("taylor" if "lma=taylor" in row["settings"] else "gradient") if row["method"] == "bame" else None
        top1 = [100 * s["final"]["test_acc"] for s in groups[(row["method"], row["pattern"], lma)]]
        assert row["top-1 (%)"] == _pm(top1) and row["vs static"] == f"{np.mean(top1) - static:+.2f}", row

    # every figure it links exists as PNG and PDF
    links = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", text, flags=re.MULTILINE)
    names = {Path(link).stem for link in links}
    assert {"pareto", "readings", "phase_breakdown", "training_loss", "layer_flips", "frozen_fraction"} <= names
    for link in links:
        assert (path.parent / link).read_bytes()[:4] == b"\x89PNG"
        assert (path.parent / link).with_suffix(".pdf").read_bytes()[:4] == b"%PDF"

    # each group's run ids and commands
    section = text.split("## Groups: runs and commands\n", 1)[1].split("\n## ", 1)[0]
    for runs in groups.values():
        for summary in runs:
            line = next(ln for ln in section.splitlines() if summary["run_id"] in ln)
            assert "bame train --config" in line and f"train.seed={summary['seed']}" in line
    assert "## Runs not completed" in text and "running" in text  # the unfinished run, nested

    # again: the report it wrote is replaced; as HTML next to it
    assert main(["report", str(report_runs), "--out", str(report_runs / "report.html")]) == 0
    html = (report_runs / "report.html").read_text()
    assert html.count("<table") >= 4 and '<img src="figures/pareto.png"' in html
    assert main(["report", str(report_runs)]) == 0


def test_report_refuses_bad_input_before_writing_anything(report_runs, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("bame: error: ")
        return err

    assert "not a folder of runs" in error(str(tmp_path / "missing"))
    assert "no run folders under" in error(str(tmp_path))
    assert "a report is .md or .html" in error(str(report_runs), "--out", str(tmp_path / "report.pdf"))
    mine = tmp_path / "notes.md"
    mine.write_text("# my notes\n")
    assert "was not written by bame report" in error(str(report_runs), "--out", str(mine))
    assert mine.read_text() == "# my notes\n"
    assert "no config key 'method.bame.nope'" in error(str(report_runs), "--out", str(tmp_path / "r.md"),
                                                        "--family", "method.bame.nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]  # no report, no figures
