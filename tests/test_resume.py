"""Resume integrity: the checkpoint's own config is the truth, and a failed resume downgrades nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import bame
from bame.cli import main
from bame.methods import METHODS
from bame.runs import load_run

from test_checkpoint import snapshot
from test_train import _Boom, _failing, quick


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = quick("method.name=static", "train.max_steps=3", "train.checkpoint_every_steps=2")
    return bame.train(cfg, out_dir=out, verbose=False).run_dir


@pytest.fixture
def fresh(completed, tmp_path) -> Path:
    return Path(shutil.copytree(completed, tmp_path / completed.name))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bame: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("edit, diff", [
    (("pattern: '2:4'", "pattern: '1:4'"), "method.pattern: '2:4' -> '1:4'"),
    (("name: static", "name: bame"), "method.name: 'static' -> 'bame'"),
    (("lr: 0.05", "lr: 0.5"), "train.lr: 0.05 -> 0.5"),
])
def test_a_hand_edited_config_is_refused_with_a_diff(fresh, capsys, edit, diff):
    cfg_path = fresh / "config.yaml"
    text = cfg_path.read_text()
    assert edit[0] in text
    cfg_path.write_text(text.replace(edit[0], edit[1], 1))
    before = snapshot(fresh)
    assert main(["train", "--resume", str(fresh), "--set", "train.max_steps=6"]) == 2
    err = _one_line(capsys)
    assert "differs from the config the checkpoint was trained under" in err and diff in err
    assert snapshot(fresh) == before  # still completed, DONE kept, the edited file not rewritten


def test_the_keys_a_resume_may_change(fresh):
    res = bame.train(resume=fresh, overrides=["train.max_steps=6", "train.log_every_steps=1",
                                              "train.checkpoint_every_steps=1", "train.nan_patience=3",
                                              "train.eval_every_epochs=0.5"], verbose=False, progress=False)
    assert res.status == "completed" and load_run(fresh).config.train.log_every_steps == 1
    steps = [int(r["step"]) for r in load_run(fresh).rows("metrics") if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-3:] == [4, 5, 6]


def test_a_failed_extension_leaves_the_completed_run_as_it_was(fresh, capsys, monkeypatch):
    before = load_run(fresh)
    summary, config, done = before.summary, (fresh / "config.yaml").read_bytes(), (fresh / "DONE").read_bytes()
    with monkeypatch.context() as mp:
        mp.setitem(METHODS, "static", _failing(_Boom, at_step=4))  # the 5th step
        with pytest.raises(_Boom):
            bame.train(resume=fresh, overrides=["train.max_steps=8"], verbose=False, progress=False)
    r = load_run(fresh)
    assert r.status == "completed" and r.done and r.summary == summary
    assert (fresh / "config.yaml").read_bytes() == config and (fresh / "DONE").read_bytes() == done
    entry = r.manifest["resumes"][-1]
    assert entry["status"] == "failed" and "injected" in entry["error"] and entry["previous_status"] == "completed"
    assert main(["inspect", str(fresh)]) == 0
    text = capsys.readouterr().out
    assert "status    completed  [DONE]" in text and "extension from step 3 to 8: failed" in text
    assert f"bame train --resume {fresh} --set train.max_steps=8" in text
    res = bame.train(resume=fresh, overrides=["train.max_steps=8"], verbose=False, progress=False)
    r = load_run(fresh)
    assert res.status == "completed" and r.done and r.summary["steps"] == 8 and r.config.train.max_steps == 8
    assert r.manifest["resumes"][-1]["status"] == "completed"


def test_a_checkpoint_that_does_not_fit_changes_nothing(fresh, capsys):
    ckpt_path = fresh / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)  # the test's own file
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("classifier.")}
    torch.save(ckpt, ckpt_path)
    before = snapshot(fresh)
    assert main(["train", "--resume", str(fresh), "--set", "train.max_steps=6"]) == 2
    err = _one_line(capsys)
    assert f"{ckpt_path}: does not fit the model and method" in err and "classifier" in err
    assert snapshot(fresh) == before
