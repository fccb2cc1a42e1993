"""Runs that cannot train fail with one line (exit 2) before any run folder exists."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bame.cli import main
from bame.config import from_dict

from test_train import QUICK, SMALL


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("bame: error: ")
    return err


def _train(out: Path, *extra: str, config: str = str(QUICK)) -> int:
    return main(["train", "--config", config, "--out", str(out), "--set", *SMALL, "train.max_steps=2", *extra])


def _no_folder(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("extra, words", [
    (["train.device=gpu0"], ["train.device", "'gpu0' is not a device", "cuda:N"]),
    (["train.batch_size=1000"], ["train.batch_size", "128 training items", "lower train.batch_size"]),
    (["data.synthetic_image_size=4"], ["lenet5 cannot run on the data's 1x4x4 images", "data.synthetic_image_size"]),
    (["method.pattern=3:7"], ["3:7 fits no layer of lenet5", "K: conv2 150, fc1 400, fc2 120", "M=4 fits 2 of 3"]),
    (["model.name=resnet20", "data.synthetic_image_size=32", "method.pattern=2:5"],
     ["2:5 fits no layer of resnet20", "layer1.0.conv1 144", "M=4 fits 20 of 20"]),
    (["method.on_indivisible=error", "method.pattern=1:16"],
     ["layer 'conv2'", "K=150 is not a multiple of 16", "method.on_indivisible=dense"]),
    (["method.name=srste", "method.pattern=4:4"], ["4:4 keeps every weight", "method.name=dense"]),
])
def test_a_run_that_cannot_train_is_one_line_and_leaves_no_folder(tmp_path, capsys, extra, words):
    out = tmp_path / "runs"
    assert _train(out, *extra) == 2
    err = _error(capsys)
    for word in words:
        assert word in err, (word, err)
    assert "swaps_per_block" not in err  # 4:4: a BAME option is no concern of SR-STE
    assert _no_folder(out)


def test_out_and_config_mistakes(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert _train(afile) == 2
    assert "--out" in (err := _error(capsys)) and "is a file, not a folder" in err
    assert _train(afile / "runs") == 2
    assert "is a file, so no folder can be made under it" in _error(capsys)
    assert afile.read_text() == "mine"
    assert _train(tmp_path / "runs", config=str(QUICK.parent)) == 2
    assert "is a folder, not a config file" in (err := _error(capsys)) and ".yaml)" in err
    assert _no_folder(tmp_path / "runs")


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write in: read-only mode, or (as root, who ignores modes) immutable."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    immutable = False
    if os.access(folder, os.W_OK) and os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a folder unwritable for root here (no chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o700)


def test_an_unwritable_out_folder_is_one_line(unwritable, capsys):
    assert _train(unwritable / "runs") == 2
    err = _error(capsys)
    assert f"cannot write in {unwritable}" in err and "--out" in err
    assert not any(unwritable.iterdir())


def test_method_sections_are_checked_only_for_the_method_that_reads_them():
    odd = {"swaps_per_block": 100, "rho": 3.0}
    cfg = from_dict({"method": {"name": "srste", "pattern": "2:4", "bame": odd}})
    assert cfg.method.bame.swaps_per_block == 100  # SR-STE never reads method.bame
    with pytest.raises(Exception, match=r"method\.bame\.swaps_per_block(.|\n)*method\.bame\.rho"):
        from_dict({"method": {"name": "bame", "pattern": "2:4", "bame": odd}})
    with pytest.raises(Exception, match="expected a number"):  # a type error is still an error
        from_dict({"method": {"name": "srste", "bame": {"rho": "lots"}}})
