"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def exact_float32():
    """TF32 off for the test: it would make CUDA float32 matmuls/convs differ from the CPU by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small matrix work: more only cost, badly so on a loaded machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# real run folders for the tests of analysis/, the figures and the report

def load_module(path: Path):
    """The Python file at ``path`` (a script or the notebook builder, not a package module), imported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK_METHODS = ("bame", "srste", "static", "dense")
QUICK_SEEDS = (0, 1)
# configs/quick.yaml, smaller still: 2 epochs of 4 steps of 32 images, BAME adapting at steps 0 and 2
SHORTER = ("data.synthetic_train_size=128", "train.batch_size=32", "data.synthetic_test_size=64")


@pytest.fixture(scope="session")
def train_quick():
    """``train_quick(out, "method.name=srste", ...)``: one real run of configs/quick.yaml, cut to 8 steps
    (a few seconds on a CPU), into the folder ``out``."""
    from pathlib import Path

    from bame.cli import main

    quick = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"

    def train(out, *sets: str) -> None:
        rc = main(["train", "--config", str(quick), "--out", str(out), "--no-progress", "--set", *SHORTER, *sets])
        assert rc == 0, sets

    return train


def _make_partial_copy(src, dst, upto_step: int):
    """A copy of a finished run as it looked while still training at ``upto_step``."""
    import json
    import shutil

    import pandas as pd

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    (dst / "DONE").unlink()
    (dst / "summary.json").unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(id=dst.name, status="running", finished=None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for table in ("metrics", "masks", "adaptation", "flops"):
        path = dst / f"{table}.csv"
        if path.exists():
            df = pd.read_csv(path)
            df[df["step"] <= upto_step].to_csv(path, index=False)
    return dst


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory, train_quick):
    """Real run folders: configs/quick.yaml for bame, srste, static, dense with 2 seeds each (a few
    seconds in all on a CPU) under ``quick/``, and one unfinished run (a finished one cut back to
    mid-training) under ``unfinished/``."""
    root = tmp_path_factory.mktemp("runs")
    out = root / "quick"
    for method in QUICK_METHODS:
        for seed in QUICK_SEEDS:
            train_quick(out, f"method.name={method}", f"train.seed={seed}")
    src = next(p for p in sorted(out.iterdir()) if "-bame-" in p.name)
    _make_partial_copy(src, root / "unfinished" / (src.name + "-partial"), upto_step=4)
    return root


@pytest.fixture(scope="session")
def runs(runs_root):
    """``analysis.load_runs`` of the ``runs_root`` fixture."""
    import analysis

    return analysis.load_runs(runs_root)


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """A Jupyter data dir whose kernels/python3 runs this interpreter (``sys.executable``): set it as
    ``JUPYTER_PATH`` so that a kernel never is whichever ``python`` happens to be first on ``PATH``."""
    import json
    import sys

    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (bame tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


# --------------------------------------------------------------------------------------------------
# bame's own loop on real data: the reference that bame.attach and the Lightning callback must equal

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
# Fashion-MNIST (data/, `make data`), LeNet-5, BAME 2:4: 320 images in batches of 64 (5 steps an epoch), 2 epochs,
# 10 steps; BAME adapts at steps 0 and 2 (interval 2, t_f = step 5); SGD with momentum, decay, a cosine LR
FMNIST_STEPS = 10
FMNIST_SETS = ("data.name=fashion-mnist", f"data.root={REPO_DATA}", "data.train_subset=320", "data.test_subset=100",
               "model.name=lenet5", "method.name=bame", "method.pattern=2:4", "method.bame.interval_steps=2",
               "method.bame.rho=0.2", "train.epochs=2", "train.batch_size=64", "train.eval_batch_size=100",
               "train.lr=0.05", "train.progress=false")


@pytest.fixture(scope="session")
def fmnist_bame_run(tmp_path_factory):
    """``(cfg, result)`` of ``bame.train`` for FMNIST_STEPS steps of FMNIST_SETS (configs/quick.yaml otherwise)."""
    import bame
    from bame.config import load_config

    if not (REPO_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST is not in data/ (make data)")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml", list(FMNIST_SETS))
    result = bame.train(cfg, out_dir=tmp_path_factory.mktemp("fmnist"), verbose=False)
    assert result.steps == FMNIST_STEPS
    return cfg, result
