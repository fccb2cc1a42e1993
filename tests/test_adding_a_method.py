"""docs/adding_a_method.md's example is a method: dropped as one file into a copy of bame/methods/, it trains,
its config section is read, checked and recorded, and nothing else had to change."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from bame.nm import nm_mask

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick.yaml"


def example_source() -> str:
    """The guide's first python block: the whole file bame/methods/refresh.py."""
    text = (REPO / "docs" / "adding_a_method.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_guide_example_is_a_method_in_one_file(tmp_path):
    package = tmp_path / "src" / "bame"
    shutil.copytree(REPO / "bame", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "refresh.py").write_text(example_source())
    out = tmp_path / "runs"
    code = f"""
import json
import bame
from bame.config import ConfigError, load_config
assert bame.__file__.startswith({str(package)!r}), bame.__file__
sets = ["method.name=refresh", "method.refresh.every_steps=2", "train.max_steps=4", "train.progress=false",
        "data.synthetic_train_size=128", "data.synthetic_test_size=32", "train.batch_size=32"]
result = bame.train(load_config({str(QUICK)!r}, sets), out_dir={str(out)!r}, verbose=False)
errors = []
for bad in (["method.refresh.every_steps=0"], ["method.refresh.every_step=3"]):
    try:
        load_config(None, ["method.name=refresh", *bad])
    except ConfigError as err:
        errors += err.errors
print(json.dumps({{"status": result.status, "run_dir": str(result.run_dir), "errors": errors}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(package.parent), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    run = Path(facts["run_dir"])
    assert facts["status"] == "completed" and "-refresh-2of4-" in run.name
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["refresh"] == {"every_steps": 2}
    assert facts["errors"] == [
        "<defaults> + --set: method.refresh.every_steps: must be >= 1, got 0",
        "<defaults> + --set: method.refresh.every_step: unknown key (did you mean 'method.refresh.every_steps'?)"]
    # the last of the 4 steps re-chose every mask: each is the top-N |W| of the final weights
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    masks = [k for k in state if k.endswith(".mask")]
    assert masks
    for key in masks:
        weight = state[key.removesuffix("mask") + "weight"]
        assert torch.equal(state[key], nm_mask(weight.abs(), 2, 4)), key
