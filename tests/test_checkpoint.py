"""Checkpoints load with torch.load(weights_only=True): no file in a run folder can run code."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bame
from bame.cli import main
from bame.methods import METHODS
from bame.runs import load_run

from test_train import quick


class _Payload:
    """What a crafted last.pt holds: unpickling it calls ``open(marker, 'w')`` (any call would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    """A completed 2-step static run (copied per test by ``fresh``)."""
    out = tmp_path_factory.mktemp("runs")
    return bame.train(quick("method.name=static", "train.max_steps=2"), out_dir=out, verbose=False).run_dir


@pytest.fixture
def fresh(completed, tmp_path) -> Path:
    return Path(shutil.copytree(completed, tmp_path / completed.name))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (but the lock file, which a refused writer may create) by relative path."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_training_checkpoint_loads_with_weights_only_and_no_allow_list(tmp_path):
    res = bame.train(quick("method.name=bame", "train.max_steps=2"), out_dir=tmp_path, verbose=False)
    ckpt = torch.load(res.run_dir / "checkpoints" / "last.pt", weights_only=True)  # torch's own rules only
    assert ckpt["step"] == 2 and ckpt["format"] == 2 and torch.is_tensor(ckpt["rng"]["numpy"]["key"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_state_loads_with_weights_only(method):
    """What each method (and the optimizer it resets) puts in a checkpoint, after adaptation steps."""
    from test_methods import Run, method_cfg

    a = Run(method_cfg(method))
    a.run(3)  # past BAME's adaptation at step 0
    buf = io.BytesIO()
    torch.save({"method": a.method.state_dict(), "optimizer": a.opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = Run(method_cfg(method))
    b.method.load_state_dict(state["method"])
    b.opt.load_state_dict(state["optimizer"])


def test_a_malicious_checkpoint_is_refused_and_nothing_in_it_runs(fresh, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt_path = fresh / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)  # the test's own file
    torch.save({**ckpt, "extra": _Payload(marker)}, ckpt_path)
    before = snapshot(fresh)
    for argv in (["export", str(fresh)], ["train", "--resume", str(fresh), "--set", "train.max_steps=4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bame: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"{ckpt_path}: refused" in err and "open" in err and "nothing in it ran" in err
        assert not marker.exists(), argv
    assert snapshot(fresh) == before  # the resume changed nothing (status, DONE, config)
    from bame.checkpoint import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError):  # the API refuses too
        load_run(fresh).load_checkpoint()
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_folder_left_alone(fresh, capsys, damage):
    ckpt_path = fresh / "checkpoints" / "last.pt"
    data = ckpt_path.read_bytes()
    ckpt_path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    before = snapshot(fresh)
    for argv in (["export", str(fresh)], ["train", "--resume", str(fresh), "--set", "train.max_steps=4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"{ckpt_path}: the checkpoint is damaged" in err and "cannot be loaded" in err
    assert snapshot(fresh) == before
    assert json.loads((fresh / "manifest.json").read_text())["status"] == "completed"


def test_a_checkpoint_of_an_older_version_still_resumes(fresh):
    """Before format 2, NumPy's RNG key was an ndarray: the few NumPy globals that rebuild it are allowed."""
    ckpt_path = fresh / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    for rng in (ckpt["rng"], ckpt["epoch_rng"]):
        if rng is not None:
            state = rng["numpy"]
            rng["numpy"] = (state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"],
                            state["has_gauss"], state["cached_gaussian"])
    torch.save({**ckpt, "format": 1}, ckpt_path)
    res = bame.train(resume=fresh, overrides=["train.max_steps=4"], verbose=False, progress=False)
    assert res.status == "completed" and load_run(fresh).summary["steps"] == 4
