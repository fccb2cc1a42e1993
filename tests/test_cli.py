"""The `bame` command line: train / resume / sweep / inspect end to end, and one-line user errors."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from bame.cli import main
from bame.methods import METHODS
from bame.runs import find_runs, load_run

from test_train import QUICK, SMALL, _failing, collaborators  # noqa: F401  (fixture: fakes for missing modules)

def sets(*extra: str) -> list[str]:
    return ["--set", *SMALL, *extra]


def train(tmp_path: Path, *extra: str) -> Path:
    before = {r.path for r in find_runs(tmp_path)}
    assert main(["train", "--config", str(QUICK), "--out", str(tmp_path), *sets(*extra)]) == 0
    (run,) = [r.path for r in find_runs(tmp_path) if r.path not in before]
    return run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith("bame: error: ")
    return err


def test_train_and_inspect(tmp_path, capsys):
    run = train(tmp_path, "train.max_steps=9")
    out = capsys.readouterr().out
    assert str(run) in out
    r = load_run(run)
    assert r.done and r.status == "completed"
    assert r.manifest["command"][:2] == ["bame", "train"]
    assert main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    for piece in ("x dense", "status    completed", "quick: synthetic / lenet5 / bame 2:4 / seed 0", "test top-1",
                  "FLOPs = 2 x MACs", "wall time", "sparsify  5 decisions: 2 sparse, 3 dense", "9 / 16 steps"):
        assert piece in text, piece
    assert main(["inspect", str(tmp_path)]) == 0  # a folder of runs: one line each
    table = capsys.readouterr().out
    assert r.id in table and "completed" in table


def test_resume_through_the_cli(tmp_path, capsys):
    run = train(tmp_path, "train.max_steps=3", "method.name=srste")
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=6"]) == 0
    r = load_run(run)
    assert r.done and r.summary["steps"] == 6 and len(r.manifest["resumes"]) == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=7", "train.lr=0.3"]) == 2
    err = one_line_error(capsys)
    assert "train.lr" in err and "only train.max_steps, train.progress" in err


def test_interrupted_run_says_how_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, "static", _failing(KeyboardInterrupt, at_step=9))
    code = main(["train", "--config", str(QUICK), "--out", str(tmp_path), *sets("method.name=static")])
    assert code == 130
    (run,) = find_runs(tmp_path)
    out = capsys.readouterr()
    assert "interrupted" in out.err and f"bame train --resume {run.path}" in out.out
    assert run.status == "interrupted" and not run.done
    assert main(["inspect", str(run.path)]) == 0
    assert "status    interrupted" in capsys.readouterr().out


def test_sweep_runs_the_grid_and_skips_completed(tmp_path, capsys):
    argv = ["sweep", "--config", str(QUICK), "--methods", "static,dense", "--patterns", "2:4", "--seeds", "0",
            "--out", str(tmp_path), "--set", *SMALL, "train.max_steps=2"]
    assert main(argv) == 0
    assert "2 run, 0 skipped" in capsys.readouterr().out
    runs = find_runs(tmp_path)
    assert sorted(r.config.method.name for r in runs) == ["dense", "static"]
    assert all(r.done for r in runs)
    argv[argv.index("--seeds") + 1] = "0,1"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 run, 1 skipped" not in out and "2 run, 2 skipped" in out
    assert len(find_runs(tmp_path)) == 4


def test_sweep_validates_the_whole_grid_first(tmp_path, capsys):
    code = main(["sweep", "--config", str(QUICK), "--methods", "bame", "--patterns", "2:4,3:2", "--out",
                 str(tmp_path)])
    assert code == 2 and "method.pattern" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in one_line_error(capsys)

    assert main(["train", "--config", str(QUICK), "--set", "train.batchsize=3"]) == 2
    assert "did you mean 'train.batch_size'" in one_line_error(capsys)

    assert main(["train", "--config", str(QUICK), "--set", "method.pattern=5:4"]) == 2
    assert "method.pattern" in one_line_error(capsys)

    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  pattern: 1:16\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "quote it" in one_line_error(capsys)

    assert main(["train", "--config", str(QUICK), "--out", str(tmp_path / "runs"), "--set",
                 "data.name=fashion-mnist", f"data.root={tmp_path / 'data'}"]) == 2
    err = one_line_error(capsys)
    assert "fashion-mnist" in err and "bame data get fashion-mnist" in err
    assert not (tmp_path / "runs").exists()  # no folder for a run that could not start

    assert main(["inspect", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(["train", "--resume", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in one_line_error(capsys)

    assert main(["train"]) == 2
    assert "--config" in one_line_error(capsys)


def test_python_dash_m_bame(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bame", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("bame", run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sweep", "inspect", "data", "flops", "export"):
        assert cmd in out


def test_an_import_error_inside_a_command_is_not_hidden():
    """A command whose module fails to import stops the command line with that error (it used to turn into
    an 'unavailable' stub that hid it)."""
    import subprocess

    code = "import sys; sys.modules['bame.report'] = None; import bame.cli; bame.cli.main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "import of bame.report halted" in out.stderr
    assert "unavailable" not in out.stdout + out.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly(monkeypatch, capsys):
    """`bame flops --json | head`: stdout's reader is gone; exit 141 (128 + SIGPIPE), no traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    gone = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", gone)
    try:
        assert main(["flops", "--config", str(QUICK), "--json"]) == 141
        gone.write("after\n")  # stdout now leads to /dev/null: a final flush cannot raise again
        gone.flush()
    finally:
        gone.close()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name, damage", [("manifest.json", '{"status": "compl'), ("summary.json", ""),
                                          ("config.yaml", "method: [unclosed\n")])
def test_a_damaged_run_folder_is_one_line_and_folders_of_runs_go_on(tmp_path, capsys, name, damage):
    good = train(tmp_path, "train.max_steps=2", "method.name=static")
    bad = train(tmp_path, "train.max_steps=2", "method.name=dense")
    (bad / name).write_text(damage)
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 2
    err = one_line_error(capsys)
    assert f"{bad / name} is damaged" in err and "restore it from a copy" in err
    assert main(["inspect", str(tmp_path)]) == 0  # the folder of runs: every run listed, the damaged one flagged
    captured = capsys.readouterr()
    if name != "config.yaml":  # a one-line listing does not read config.yaml
        assert f"{bad / name} is damaged" in captured.err and "damaged" in captured.out
    assert good.name in captured.out and "completed" in captured.out
    argv = ["sweep", "--config", str(QUICK), "--methods", "static,dense", "--out", str(tmp_path), "--set", *SMALL,
            "train.max_steps=2"]
    assert main(argv) == 0  # past the damaged folder: the static run is found
    out = capsys.readouterr()
    assert "skip method.name=static" in out.out
    if name == "summary.json":  # status and config are intact: the run completed
        assert "skip method.name=dense" in out.out
    else:  # the dense run cannot be read: it is trained again
        assert "run method.name=dense" in out.out
        assert f"{bad / name} is damaged" in out.err


def test_a_dense_run_id_has_no_pattern_and_listings_show_dense(tmp_path, capsys):
    run = train(tmp_path, "train.max_steps=2", "method.name=dense", "method.pattern=1:4")
    assert run.name.endswith("-quick-dense-s0")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[2:4] == ["dense", "dense"]
    from analysis import load_runs, paper_table

    assert paper_table(load_runs(tmp_path))["pattern"].tolist() == ["dense"]
