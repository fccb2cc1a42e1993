"""`bame sweep` variants and parallel jobs, on the quick config."""

import re

from bame.cli import main
from bame.config import load_config
from bame.runs import find_runs

QUICK = ["train.max_steps=3", "data.synthetic_train_size=256", "data.synthetic_test_size=64"]


def test_variants_make_one_run_each_and_are_skipped_when_done(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", "configs/quick.yaml", "--out", str(out), "--methods", "bame", "--seeds", "0",
            "--no-progress", "--set", *QUICK, "--variant", "base", "--variant", "method.bame.rho=0.5",
            "--variant", "method.bame.lma=gradient", "method.bame.regrow=zero"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sweep progress: 0/3 runs done, 3 left" in printed
    assert re.search(r"sweep progress: 1/3 runs done, 2 left, about \d+s to go \(\d+s per run\)", printed)
    assert "sweep progress: 3/3 runs done, 0 left" in printed
    runs = [r for r in find_runs(out) if r.done]
    assert len(runs) == 3
    configs = sorted((r.config.method.bame.rho, r.config.method.bame.lma, r.config.method.bame.regrow) for r in runs)
    base = load_config("configs/quick.yaml").method.bame
    assert configs == sorted([(base.rho, base.lma, base.regrow), (0.5, base.lma, base.regrow), (base.rho, "gradient", "zero")])
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 run, 3 skipped" in capsys.readouterr().out


def test_parallel_jobs_run_in_subprocesses_with_logs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", "configs/quick.yaml", "--out", str(out), "--methods", "static,srste",
            "--seeds", "0", "--jobs", "2", "--set", *QUICK]
    assert main(argv) == 0
    runs = [r for r in find_runs(out) if r.done]
    assert sorted(r.config.method.name for r in runs) == ["srste", "static"]
    logs = sorted((out / "sweep-logs").glob("*.log"))
    assert len(logs) == 2 and all("done:" in log.read_text() for log in logs)
    # Each child trained the config the sweep resolved, saved beside its log.
    resolved = {r.config.method.name: r.config for r in runs}
    for log in logs:
        cfg = load_config(log.with_suffix(".yaml"))
        assert cfg == resolved[cfg.method.name]


def test_failed_parallel_run_is_reported_and_sets_exit_status(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", "configs/quick.yaml", "--out", str(out), "--methods", "static", "--seeds", "0",
            "--jobs", "2", "--set", *QUICK, "data.root=/nonexistent", "data.name=mnist"]
    assert main(argv) == 1
    assert "exit status" in capsys.readouterr().err


def test_a_static_run_stays_done_when_only_bame_options_differ(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", "--config", "configs/quick.yaml", "--out", str(out), "--methods", "static,bame", "--seeds", "0",
            "--no-progress", "--set", *QUICK]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base[:-len(QUICK) - 1] + ["--set", *QUICK, "method.bame.rho=0.7"]) == 0
    printed = capsys.readouterr().out
    assert "skip method.name=static" in printed  # BAME's section does not touch a static run
    assert "run method.name=bame" in printed  # but it is a new BAME experiment


def test_sweep_progress_counts_runs_and_estimates_from_finished_wall_times():
    from bame.progress import SweepProgress, format_duration

    p = SweepProgress(to_run=5, jobs=2)
    assert p.line() == "sweep progress: 0/5 runs done, 5 left"
    p.finished(60.0)
    assert p.finished(120.0) == "sweep progress: 2/5 runs done, 3 left, about 2m15s to go (1m30s per run)"
    assert p.eta_s() == 90.0 * 3 / 2  # mean x left / jobs at a time
    p.finished(30.0), p.finished(30.0)
    assert p.eta_s() == 60.0  # one left: the jobs cannot share it
    assert p.finished(30.0).endswith("5/5 runs done, 0 left")
    assert [format_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
