"""``train.tensorboard``: the events, read back with TensorBoard's own reader, hold the run folder's numbers,
also across a resume after a crash (no step twice)."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bame
from bame.cli import main
from bame.contract import TENSORBOARD_DIR
from bame.methods import METHODS
from bame.runs import load_run
from bame.tensorboard_sink import ADAPTATION_TAGS

from test_train import quick

# 16 steps of 16 synthetic images, a row every 2 steps, checkpoints at 4 and 8 (and the epoch end, 8);
# BAME adapts at 0, 2, 4, 6. The first process dies in step index 10, after the row at step 10.
SETS = ["method.name=bame", "train.tensorboard=true", "train.log_every_steps=2", "train.checkpoint_every_steps=4"]
CRASH_AT = 10


class _Crash(Exception):
    pass


def _crashing(at_step: int):
    class Crashing(METHODS["bame"]):
        def after_backward(self, step: int) -> None:
            super().after_backward(step)
            if step == at_step:
                raise _Crash("injected")
    return Crashing


def _events(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Steps equal; values equal as float32 (the events' precision)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run that crashed after its checkpoint at step 8, resumed to the end; and the crashed events."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "bame", _crashing(CRASH_AT))
        with pytest.raises(_Crash):
            bame.train(quick(*SETS), out_dir=out, verbose=False)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    crashed = _events(run_dir / TENSORBOARD_DIR)
    res = bame.train(resume=run_dir, verbose=False, progress=False)
    assert res.status == "completed" and res.steps == 16
    return load_run(run_dir), crashed, _events(run_dir / TENSORBOARD_DIR)


def test_the_crashed_process_had_logged_past_its_checkpoint(resumed):
    run, crashed, _ = resumed
    assert run.manifest["resumes"][0]["from_step"] == 8
    assert [s for s, _ in _scalars(crashed, "train/loss")] == [2, 4, 6, 8, 10]  # step 10 is logged twice


def test_metrics_loss_accuracy_lr_and_flops(resumed):
    run, _, acc = resumed
    metrics = run.table("metrics")
    for split in ("train", "test"):
        rows = metrics[metrics["split"] == split]
        for key in ("loss", "acc"):
            _close(_scalars(acc, f"{split}/{key}"), list(zip(rows["step"], rows[key])))
    train = metrics[metrics["split"] == "train"]
    assert train["step"].tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    _close(_scalars(acc, "train/lr"), list(zip(train["step"], train["lr"])))
    _close(_scalars(acc, "train/sad_fraction"), list(zip(train["step"], train["sad_fraction"])))
    for view in ("ideal", "executed"):
        _close(_scalars(acc, f"flops_{view}/total"), list(zip(train["step"], 2 * train[f"cum_{view}_macs"])))
        phases = run.summary["flops"]["by_phase"]
        for phase, macs in phases.items():  # the last event of each phase: the run's total
            assert _scalars(acc, f"flops_{view}/{phase}")[-1] == (16, pytest.approx(2 * macs[f"{view}_macs"]))
        per_step = np.sum([[v for _, v in _scalars(acc, f"flops_{view}/{p}")] for p in phases], axis=0)
        np.testing.assert_allclose(per_step, 2 * train[f"cum_{view}_macs"], rtol=1e-6)  # the phases add up


def test_mask_flips_and_the_blocks_of_each_adaptation(resumed):
    run, _, acc = resumed
    masks, adaptation = run.table("masks"), run.table("adaptation")
    assert len(masks) and sorted(set(adaptation["step"])) == [0, 2, 4, 6]
    for layer, rows in masks.groupby("layer"):
        _close(_scalars(acc, f"mask_flips/{layer}"), list(zip(rows["step"] + 1, rows["flips"])))
    for layer, rows in adaptation.groupby("layer"):
        for key in ADAPTATION_TAGS:
            _close(_scalars(acc, f"{key}/{layer}"), list(zip(rows["step"] + 1, rows[key])))
    assert adaptation["selected_blocks"].sum() > 0


def test_a_histogram_of_oscillation_frequency_per_layer_and_snapshot(resumed):
    run, _, acc = resumed
    files = dict(run.block_snapshots())
    snapshots = sorted(files)
    assert snapshots == [0, 2, 4, 6]
    layers = sorted(set(run.table("adaptation")["layer"]))
    for layer in layers:
        events = acc.Histograms(f"oscillation_frequency/{layer}")
        assert [e.step for e in events] == [s + 1 for s in snapshots]
        for e, step in zip(events, snapshots):
            freq = np.load(files[step])[f"{layer}.frequency"].astype(np.float64)
            h = e.histogram_value
            assert (h.num, h.min, h.max) == (freq.size, freq.min(), freq.max())
            assert h.sum == pytest.approx(freq.sum()) and sum(h.bucket) == freq.size
    assert max(e.histogram_value.max for layer in layers
               for e in acc.Histograms(f"oscillation_frequency/{layer}")) > 0  # some block oscillated


def test_no_step_twice_and_the_config_once(resumed):
    run, _, acc = resumed
    for tag in acc.Tags()["scalars"]:
        steps = [s for s, _ in _scalars(acc, tag)]
        assert steps == sorted(set(steps)), tag
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0
    shown = text.tensor_proto.string_val[0].decode()
    assert "\n".join(line[4:] for line in shown.splitlines()) + "\n" == (run.path / "config.yaml").read_text()


def test_off_by_default_and_refused_without_the_package(tmp_path, monkeypatch, capsys):
    res = bame.train(quick("train.max_steps=2"), out_dir=tmp_path / "a", verbose=False)
    assert not (res.run_dir / TENSORBOARD_DIR).exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", "--config", "quick", "--out", str(tmp_path / "b"), "--set", "train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bame: error:") and "pip install 'bame[tensorboard]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
