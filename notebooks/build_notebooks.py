"""Generate the notebooks of this folder (the source of truth is this file, not the .ipynb JSON).

    python notebooks/build_notebooks.py          # (re)write notebooks/*.ipynb, outputs stripped
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs from this file

Every notebook is thin: it calls ``bame`` (configs, training, the CLI) and ``analysis`` (run folders ->
tables and figures) and holds no method logic of its own. Each starts with a parameters cell (tag
``parameters``) read from the environment:

- ``BAME_NOTEBOOK_MODE``: ``quick`` (default; seconds on a CPU, synthetic data or a tiny Fashion-MNIST
  subset, LeNet-5) or ``full`` (the real study: Fashion-MNIST / CIFAR, several seeds; hours on a CPU);
- ``BAME_NOTEBOOK_RUNS``: the folder of run folders (quick mode: a temporary folder when unset; full
  mode: ``runs/notebooks``); each notebook writes under its own sub-folder;
- ``BAME_NOTEBOOK_DATA``: quick mode's data, ``auto`` (Fashion-MNIST when ``data/`` holds it, else
  synthetic), ``synthetic`` or ``fashion-mnist``.

Cells tagged ``check-table`` / ``check-figure`` must print a table / show a figure;
``tests/test_notebooks.py`` executes every notebook in quick mode and checks them.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _src(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


class _Cells:
    """Collects the cells of one notebook with stable ids (``<stem>-NN``), so the output is deterministic."""

    def __init__(self, stem: str) -> None:
        self.stem = stem
        self.cells: list = []

    def _id(self) -> str:
        return f"{self.stem}-{len(self.cells):02d}"

    def md(self, text: str) -> None:
        self.cells.append(new_markdown_cell(_src(text), id=self._id()))

    def code(self, text: str, *tags: str) -> None:
        metadata = {"tags": list(tags)} if tags else {}
        self.cells.append(new_code_cell(_src(text), id=self._id(), metadata=metadata))


# --------------------------------------------------------------------------------------------------
# shared cells

PARAMETERS_HEAD = r'''
# Parameters: edit here, or set the environment variables before starting Jupyter.
import os

MODE = os.environ.get("BAME_NOTEBOOK_MODE", "quick")  # "quick": seconds on a CPU; "full": the real study
RUNS = os.environ.get("BAME_NOTEBOOK_RUNS") or None  # folder of run folders (None: a temp folder / runs/notebooks)
DATA = os.environ.get("BAME_NOTEBOOK_DATA", "auto")  # quick mode: "auto", "synthetic" or "fashion-mnist"
'''


def parameters(body: str) -> str:
    return _src(PARAMETERS_HEAD) + "\n" + _src(body)


SETUP = r'''
# Set-up: the repository root, imports, this mode's config and overrides, and small helpers.
__IMPORTS__
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "bame" / "__init__.py").is_file())
if importlib.util.find_spec("bame") is None:  # bame not installed: use this checkout
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import pandas as pd
import torch

import analysis
import bame
from bame.cli import main as bame_cli
from bame.data import verify_dataset

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar; no run here shows one

assert MODE in ("quick", "full"), f"MODE must be 'quick' or 'full', not {MODE!r}"
RUNS = Path(RUNS or (tempfile.mkdtemp(prefix="bame-notebooks-") if MODE == "quick" else "runs/notebooks"))
RUNS = RUNS if RUNS.is_absolute() else ROOT / RUNS
OUT = RUNS / "__STEM__"  # this notebook's run folders and figures
SETS = [f"data.root={ROOT / 'data'}"]  # overrides every run of this notebook shares


def dataset_present(name):
    try:
        verify_dataset(name, ROOT / "data")
        return True
    except (FileNotFoundError, ValueError):
        return False


if MODE == "quick":
    torch.set_num_threads(1)  # tiny models: one thread beats several fighting over small ops
    CONFIG = ROOT / "configs" / "notebooks" / "quick.yaml"
    if DATA == "auto":
        DATA = "fashion-mnist" if dataset_present("fashion-mnist") else "synthetic"
    assert DATA in ("synthetic", "fashion-mnist"), f"DATA must be 'auto', 'synthetic' or 'fashion-mnist', not {DATA!r}"
    if DATA == "fashion-mnist":  # the synthetic images' shape (28x28 grey): a tiny real subset instead
        SETS += ["data.name=fashion-mnist", "data.train_subset=1024", "data.test_subset=512"]
else:
    CONFIG = ROOT / FULL_CONFIG
    SETS += list(FULL_SETS)
    _data = bame.load_config(CONFIG, SETS).data
    if _data.name not in ("synthetic", "imagenet"):
        verify_dataset(_data.name, _data.root)  # fails now, with how to get the data, not in every run

pd.set_option("display.width", 180)
pd.set_option("display.max_columns", 40)
print(f"mode {MODE}: config {CONFIG.relative_to(ROOT)}, overrides {SETS[1:] or 'none'}\nruns and figures in {OUT}")


def save_figure(fig, name):
    """Write the figure to OUT/figures/<name>.png (and .pdf in full mode); Jupyter shows it below the cell."""
    formats = ("png",) if MODE == "quick" else ("png", "pdf")
    return analysis.save(fig, OUT / "figures" / name, formats=formats)
'''

SWEEP_HELPER = r'''
def sweep(out, methods, seeds, patterns=None, sets=()):
    """`bame sweep` into `out`: one run per method x pattern x seed; runs already completed there are skipped.

    Quick mode keeps the training log to itself (printed only when something fails)."""
    argv = ["sweep", "--config", str(CONFIG), "--methods", ",".join(methods),
            "--seeds", ",".join(map(str, seeds)), "--out", str(out), "--no-progress"]
    if patterns:
        argv += ["--patterns", ",".join(patterns)]
    argv += ["--set", *SETS, *sets]
    log = io.StringIO()
    with contextlib.ExitStack() as quiet:
        if MODE == "quick":
            quiet.enter_context(contextlib.redirect_stdout(log))
            quiet.enter_context(contextlib.redirect_stderr(log))
        rc = bame_cli(argv)
    if rc != 0:
        print(log.getvalue())
        raise RuntimeError(f"bame sweep exited with {rc} (see the log above)")
    if MODE == "quick":
        print(log.getvalue().strip().splitlines()[-1])  # 'sweep: n run, m skipped, 0 failed'
'''


def setup(stem: str, sweep: bool = True) -> str:
    """The set-up cell of notebook ``stem``; with ``sweep``, the ``sweep`` helper too."""
    modules = ["importlib.util", "sys", "tempfile", "warnings"] + (["contextlib", "io"] if sweep else [])
    imports = "\n".join(f"import {m}" for m in sorted(modules))
    text = _src(SETUP).replace("__IMPORTS__", imports).replace("__STEM__", stem)
    if sweep:
        text += "\n\n\n" + _src(SWEEP_HELPER)
    return text


MODES_MD = """
**Modes.** `MODE = "quick"` (the default, and what the tests run) trains LeNet-5 for a few steps on
synthetic 28x28 images or a tiny Fashion-MNIST subset: it checks the plumbing in seconds, and its
numbers are no result. `MODE = "full"` runs the real study (Fashion-MNIST or CIFAR, several seeds);
set `BAME_NOTEBOOK_MODE=full` before starting Jupyter, or edit the parameters cell. Run folders and
figures go to `RUNS` (`BAME_NOTEBOOK_RUNS`); a sweep skips the runs already completed there, so a
re-run only trains what is missing.
"""


# --------------------------------------------------------------------------------------------------
# 01 quickstart


def quickstart() -> list:
    c = _Cells("01")
    c.md("""
    # 01 · Quickstart: N:M masks and one BAME run

    BAME trains a CNN whose conv/linear weights obey an **N:M pattern** (at most N non-zeros in every
    group of M consecutive weights) from the first step to the last, and computes the weight gradient
    only where the method needs it. This notebook

    1. sparsifies a model and looks at its masks (the N:M check),
    2. trains a short BAME run through the Python API,
    3. inspects the run folder it wrote,
    4. plots accuracy.
    """ + MODES_MD)
    c.code(parameters('''
    FULL_CONFIG = "configs/fmnist_lenet.yaml"  # full mode: Fashion-MNIST, LeNet-5 (a few minutes on a CPU)
    FULL_SETS = []  # extra overrides in full mode, e.g. ["train.epochs=2"]
    PATTERN = "2:4"
    '''), "parameters")
    c.code(setup("01_quickstart", sweep=False))
    c.md("""
    ## 1. Sparsify a model

    `bame.layers.sparsify` swaps every eligible `nn.Conv2d` / `nn.Linear` for an `NMConv2d` / `NMLinear`
    that carries a boolean `mask` buffer. The default layer policy keeps the first conv and the
    classifier dense, and so any layer whose reduction size `K = Cin/groups * kh * kw` is not a
    multiple of M; the report says why for each layer.
    """)
    c.code('''
    from bame import models
    from bame.layers import mask_table, nm_layers, sparsify
    from bame.nm import group_view

    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, in_channels=3)
    report = sparsify(model, PATTERN)
    print(report)
    ''')
    c.md("""
    ## 2. Look at the masks

    One convention (`bame/nm.py`): a weight is viewed as `W[Cout, K]` (`weight.reshape(Cout, -1)`) and
    a **group** is M consecutive entries of a row. The initial mask keeps the N largest magnitudes of
    each group. Every N:M layer below must hold exactly N non-zeros per group, and the weight the
    forward pass uses (`W * mask`) must be zero everywhere else.
    """)
    c.code('''
    masks = pd.DataFrame(mask_table(model))
    print(analysis.to_markdown(masks, floatfmt=".3f"))
    assert masks["exactly N per group"].all() and masks["zeros outside the mask"].all()
    ''', "check-table")
    c.code('''
    name, layer = next(nm_layers(model))
    m = layer.pattern.m
    groups = group_view(layer.mask, m, layer.layout)  # [Cout, K/M, M]
    weights = group_view(layer.weight.detach(), m, layer.layout)
    print(f"{name}: weight {tuple(layer.weight.shape)} -> {tuple(groups.shape)} = [Cout, groups per row, M]")
    print("row 0, first 3 groups: mask\\n", groups[0, :3].int())
    print("... and |W| (the mask keeps the N largest of each group)\\n", weights[0, :3].abs().round(decimals=3))
    ''')
    c.code('''
    # The same layer's mask at two patterns: the first 16 rows x 64 of W[Cout, K] (black: kept), a line every M.
    masks_at = {}
    for pattern in [PATTERN, "1:16"]:
        torch.manual_seed(0)
        m16 = models.create("resnet20", num_classes=10, in_channels=3)
        sparsify(m16, pattern)
        lay = dict(nm_layers(m16))[name]
        masks_at[pattern] = (lay.mask.reshape(lay.weight.shape[0], -1).numpy(), lay.pattern.m)
    fig = analysis.mask_image(masks_at, name)
    save_figure(fig, "masks")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## 3. Train a short BAME run through the Python API

    A config is a typed, frozen dataclass loaded from YAML plus dotted overrides; every BAME reading
    of `docs/method.md` is a field of `method.bame` (LMA score, OBF, tau, block size, T, rho, ...).
    `bame.train` writes a self-describing run folder and returns the headline numbers.
    """)
    c.code('''
    import yaml
    from bame.config import to_dict

    cfg = bame.load_config(CONFIG, SETS + ["method.name=bame", f"method.pattern={PATTERN}"])
    print(yaml.safe_dump({"method": to_dict(cfg)["method"]}, sort_keys=False))
    ''')
    c.code('''
    result = bame.train(cfg, out_dir=OUT, progress=False)
    print(f"\\n{result.status}: {result.steps} steps, test top-1 {result.test_acc:.4f}, "
          f"ideal training FLOPs {2 * result.ideal_macs:.3e} (executed {2 * result.executed_macs:.3e}; FLOPs = 2 x MACs)")
    ''')
    c.md("""
    ## 4. Inspect the run folder

    The folder holds the resolved config, the manifest (git commit, versions, seeds, status), the
    metrics, the exact FLOPs ledger per epoch x layer x phase, the mask flips, BAME's adaptation log
    and per-block snapshots, and a `DONE` marker (`docs/contracts.md`). `bame inspect` summarises it;
    the `analysis` readers turn each table into a DataFrame.
    """)
    c.code('''
    run_dir = result.run_dir
    print("\\n".join(sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())))
    print()
    assert bame_cli(["inspect", str(run_dir)]) == 0
    ''')
    c.code('''
    metrics = analysis.load_metrics(run_dir)
    print(analysis.to_markdown(metrics.tail(6), caption=False))
    print(analysis.to_markdown(analysis.load_sparsify(run_dir), caption=False))
    print(analysis.to_markdown(analysis.load_adaptation(run_dir).head(4), caption=False))
    ''', "check-table")
    c.md("## 5. Plot accuracy")
    c.code('''
    fig = analysis.learning_curves(metrics, f"BAME {PATTERN}")
    save_figure(fig, "accuracy")
    plt.show()
    ''', "check-figure")
    c.code('''
    fig = analysis.accuracy_vs_flops(OUT)  # every run under OUT; here the one above
    save_figure(fig, "accuracy_vs_flops")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## Next

    - `02_reproduce`: BAME against dense / static / STE / SR-STE / ASP, the paper table, published numbers.
    - `03_mask_oscillation`: oscillation-frequency heatmaps, frozen blocks, mask flips (SAD), OBF on/off.
    - `04_training_flops`: the exact per-phase FLOPs ledger, ideal vs executed, the paper models' costs.
    - `05_ablations`: LMA score, OBF, tau, block size, T, regrow rule, rho.

    The same from a shell: `bame train --config configs/notebooks/quick.yaml --set method.pattern=1:4`,
    `bame inspect runs/<id>`.
    """)
    return c.cells


# --------------------------------------------------------------------------------------------------
# 02 reproduce


def reproduce() -> list:
    c = _Cells("02")
    c.md("""
    # 02 · Reproduce the paper's comparison at this machine's scale

    BAME (ICML 2025) against the baselines it is measured with, all through one training loop:
    `dense`, `static` (fixed N:M mask, sparse backward), `ste`, `srste` (dense weight gradient),
    `asp` (dense, then one-shot N:M prune) and `bame`, over N:M patterns and seeds. Reported: top-1
    as mean ± std over seeds and the exact training FLOPs of each run (ideal view, FLOPs = 2 x MACs).

    The paper's headline is ImageNet / ResNet-50 at 1:16. The runs here are much smaller (Fashion-MNIST
    or CIFAR in full mode); the published numbers are shown beside ours only as a reference.
    """ + MODES_MD)
    c.code(parameters('''
    METHODS = ["dense", "static", "ste", "srste", "asp", "bame"]
    FULL_CONFIG = "configs/fmnist_resnet20.yaml"  # or "configs/paper/cifar10_resnet32.yaml" (data/cifar-10-batches-py)
    # as shipped the config fits a 2-core CPU (20k images, 2 epochs); on a GPU, the whole experiment:
    FULL_SETS = []  # e.g. ["data.train_subset=null", "train.epochs=30", "method.bame.interval_steps=100"]
    if MODE == "quick":
        PATTERNS, SEEDS = ["2:4"], [0, 1]
    else:
        PATTERNS, SEEDS = ["2:4", "1:4", "2:8", "1:16"], [0, 1, 2]
    '''), "parameters")
    c.code(setup("02_reproduce"))
    c.md("""
    ## Run the grid

    Dense ignores the pattern, so it runs once per seed; every other method runs per pattern and seed.
    Both calls are `bame sweep` (the command line's own code), so re-running this cell only trains
    what is missing.
    """)
    c.code('''
    sweep(OUT, ["dense"], SEEDS)
    sweep(OUT, [m for m in METHODS if m != "dense"], SEEDS, patterns=PATTERNS)
    runs = analysis.load_runs(OUT)
    print(runs["status"].value_counts().to_dict())
    ''')
    c.md("""
    ## The paper table

    One row per method x pattern: top-1 mean ± std over seeds, training FLOPs (exact ledger counts,
    every phase), and their ratios to dense and to SR-STE at the same pattern.
    """)
    c.code('''
    table = analysis.paper_table(runs)
    print(analysis.to_markdown(table))
    ''', "check-table")
    c.md("""
    ## Published numbers beside ours: a different scale and data set

    `analysis.load_published()` lists only figures stated verbatim in a cited source. They are
    ImageNet / ResNet-50 numbers; ours come from a small model on a small data set and a short
    schedule. Compare the **sign and size of the BAME − SR-STE gap** and the **FLOPs ratio**, never
    the absolute accuracies.
    """)
    c.code('''
    pub = analysis.load_published()
    print(analysis.to_markdown(pub, floatfmt=".1f", caption=False))
    side = analysis.published_comparison(table, pub, ours=f"this notebook ({MODE} mode)")
    print(analysis.to_markdown(side, index=True, caption=False))
    print("Different data set, model, schedule and scale: the columns are not comparable number for number.")
    ''', "check-table")
    c.md("""
    ## Accuracy against training FLOPs

    First: final top-1 against the whole run's training FLOPs, one marker per method x pattern (mean ±
    std over seeds; colour: method, marker: pattern; dashed: the Pareto front). Then: test top-1 at each
    evaluation against the cumulative training FLOPs (thin lines: runs; thick: mean over seeds with a ±1
    std band).
    """)
    c.code('''
    fig = analysis.pareto_scatter(analysis.run_points(runs))
    save_figure(fig, "final_accuracy_vs_flops")
    plt.show()
    ''', "check-figure")
    c.code('''
    fig = analysis.accuracy_vs_flops(runs)
    save_figure(fig, "accuracy_vs_flops")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## A report to keep

    `analysis.write_report` (the command line: `bame report DIR`) writes the tables, every figure (PNG +
    PDF), each group's run ids and commands and the published numbers as one markdown file next to the
    runs (`.html` too: `--out report.html`).
    """)
    c.code('''
    report = analysis.write_report(OUT, OUT / "report", title=f"BAME vs baselines ({MODE} mode)")
    print(report)
    ''')
    return c.cells


# --------------------------------------------------------------------------------------------------
# 03 mask oscillation


def mask_oscillation() -> list:
    c = _Cells("03")
    c.md("""
    # 03 · Mask oscillation and oscillation-aware block freezing (OBF)

    BAME adapts the mask inside selected **blocks** (default: one group of M weights) every `T` steps
    between `t_i` and `t_f`. A block **oscillates** when an adaptation returns its mask to the state it
    had before its previous change (A → B → A). Its oscillation frequency `f_b` is an EMA (decay
    `beta`) of that event; with OBF on, a block with `f_b >= tau` (after at least `min_changes`
    changes) is **frozen**: no candidate gradient and no mask change until `t_f`.

    This notebook shows, for BAME with `obf: true` and `obf: false`:
    per-layer heatmaps of `f_b` over adaptation steps, the fraction of frozen blocks over time, and the
    mask flips per step (SAD) of every masked method (static, STE, SR-STE, BAME).
    """ + MODES_MD)
    c.code(parameters('''
    METHODS = ["static", "ste", "srste"]  # the baselines whose mask flips (SAD) are compared with BAME's
    FULL_CONFIG = "configs/fmnist_resnet20.yaml"
    FULL_SETS = []  # extra overrides in full mode; on a GPU e.g. ["data.train_subset=null", "train.epochs=30"]
    PATTERN = "2:4"
    if MODE == "quick":
        SEEDS = [0, 1]
        # 32 steps; adapt every step in the first half, with a rho and tau that let blocks freeze that soon
        STUDY_SETS = ["train.epochs=4", "method.bame.interval_steps=1", "method.bame.rho=0.3",
                      "method.bame.tau=0.3"]
    else:
        SEEDS = [0, 1, 2]
        # adapt every 5 steps in the first half (~30 adaptations as the config ships); a snapshot every 2nd
        STUDY_SETS = ["method.bame.interval_steps=5", "instrument.block_state_every_adaptations=2"]
    '''), "parameters")
    c.code(setup("03_mask_oscillation"))
    c.md("## Runs: BAME with OBF on and off, and the masked baselines")
    c.code('''
    for obf in ("true", "false"):
        sweep(OUT, ["bame"], SEEDS, patterns=[PATTERN], sets=[*STUDY_SETS, f"method.bame.obf={obf}"])
    sweep(OUT, METHODS, SEEDS, patterns=[PATTERN], sets=STUDY_SETS)
    runs = analysis.load_runs(OUT)
    runs = runs[runs["status"] == "completed"].copy()
    runs["group"] = analysis.run_groups(runs, by=["method.bame.obf"])
    print(runs.groupby("group", sort=False)["run_id"].count().to_dict())
    ''')
    c.md("""
    ## Per-layer oscillation-frequency heatmaps

    One panel per N:M layer: x = adaptation step, y = block (sorted by final `f_b`, binned when there
    are many). With OBF on, blocks that keep oscillating are frozen once `f_b >= tau`; with OBF off
    nothing stops them.
    """)
    c.code('''
    bame_runs = runs[runs["method.name"] == "bame"]
    first_seed = bame_runs[bame_runs["train.seed"] == SEEDS[0]]
    for _, run in first_seed.sort_values("method.bame.obf", ascending=False).iterrows():
        fig = analysis.oscillation_heatmaps(run)
        fig.suptitle(f"obf={run['method.bame.obf']}: {run['run_id']}", fontsize=10)
        save_figure(fig, f"oscillation_obf_{run['method.bame.obf']}")
        plt.show()
    ''', "check-figure")
    c.md("## Fraction of frozen blocks over time")
    c.code('''
    fig = analysis.frozen_fraction(bame_runs)
    save_figure(fig, "frozen_fraction")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## Mask flips per step (SAD) per method

    SAD counts the mask entries a step changed, over all N:M weights. STE and SR-STE recompute the
    mask from `|W|` every step; static never changes it; BAME changes it only on adaptation steps,
    inside the selected blocks, and not at all after `t_f`.
    """)
    c.code('''
    # one figure per comparison: the baselines with BAME (OBF on), then BAME with OBF on vs off
    methods_vs_bame = runs[(runs["method.name"] != "bame") | runs["method.bame.obf"].astype(bool)]
    for subset, name in ((methods_vs_bame, "methods"), (bame_runs, "obf")):
        for value in ("flip_fraction", "cumulative"):
            fig = analysis.mask_flips(subset, value=value)
            save_figure(fig, f"mask_flips_{name}_{value}")
            plt.show()
    ''', "check-figure")
    c.md("""
    ## OBF on vs off: numbers

    Per run: total mask flips, oscillation events (A → B → A returns), the fraction of blocks frozen at
    the last adaptation step, and final top-1; then mean ± std over seeds per group.
    """)
    c.code('''
    stats = analysis.mask_stats(runs)
    summary = analysis.mean_std_table(stats, "group", analysis.MASK_STAT_DIGITS)
    print(analysis.to_markdown(summary, index=True, caption=False))
    ''', "check-table")
    c.md("""
    ## Where the frozen blocks are

    The last block snapshot of one OBF run, per layer: how many blocks changed, their mean frequency
    and the share frozen.
    """)
    c.code('''
    run = first_seed[first_seed["method.bame.obf"].astype(bool)].iloc[0]
    found = analysis.block_summary(run)
    if found is None:
        print(f"{run['run_id']} saved no block snapshot (instrument.block_state_every_adaptations)")
    else:
        step, per_layer = found
        print(f"snapshot at step {step} of {run['run_id']}")
        print(analysis.to_markdown(per_layer, index=True, floatfmt=".3g", caption=False))
    ''', "check-table")
    return c.cells


# --------------------------------------------------------------------------------------------------
# 04 training FLOPs


def training_flops() -> list:
    c = _Cells("04")
    c.md("""
    # 04 · Training FLOPs: the exact per-phase ledger

    Every conv/linear layer is charged per step and per phase, from the shapes and the masks the
    kernels really used (`bame/flops.py`), in MACs; **FLOPs = 2 x MACs**. Phases: forward, input
    gradient, weight gradient, and mask adaptation (scoring and selection). Two views:

    - **ideal**: the work on the weights used, `nnz(W*m) x positions` (forward, input gradient) and
      `|P| x positions` (weight gradient, `P` the positions it is computed at);
    - **executed**: what this machine's kernels ran (masked dense kernels execute dense work).

    Per step, for a sparse layer with dense forward MACs `f_D` and `f_S = (N/M) f_D`: dense `3 f_D`;
    STE / SR-STE `2 f_S + f_D`; static `3 f_S`; BAME `3 f_S` plus the candidate blocks' share of
    `f_D` on adaptation steps (docs/method.md).
    """ + MODES_MD)
    c.code(parameters('''
    METHODS = ["dense", "static", "ste", "srste", "asp", "bame"]
    FULL_CONFIG = "configs/fmnist_resnet20.yaml"
    FULL_SETS = []  # extra overrides in full mode; on a GPU e.g. ["data.train_subset=null", "train.epochs=30"]
    # the paper models, measured with `bame flops` (a real forward + backward per step kind)
    PAPER_CONFIGS = ["configs/paper/imagenet_resnet50.yaml"]
    if MODE == "quick":
        PATTERN, SEEDS = "2:4", [0]
        PAPER_METHODS, PAPER_PATTERNS = ["srste", "bame"], ["1:16"]  # dense: every report measures it
    else:
        PATTERN, SEEDS = "1:16", [0]
        PAPER_CONFIGS += ["configs/paper/imagenet_resnet18.yaml", "configs/paper/cifar10_resnet32.yaml",
                          "configs/paper/cifar10_mobilenet_v2.yaml"]
        PAPER_METHODS, PAPER_PATTERNS = ["static", "ste", "srste", "asp", "bame"], ["2:4", "1:4", "2:8", "1:16"]
    '''), "parameters")
    c.code(setup("04_training_flops"))
    c.md("## Runs: every method at one pattern")
    c.code('''
    sweep(OUT, ["dense"], SEEDS)
    sweep(OUT, [m for m in METHODS if m != "dense"], SEEDS, patterns=[PATTERN])
    runs = analysis.load_runs(OUT)
    runs = runs[runs["status"] == "completed"]
    runs["group"] = analysis.run_groups(runs)
    ''')
    c.md("""
    ## Per-phase breakdown per method, ideal vs executed

    Whole-run training FLOPs per phase from each run's `flops.csv` (mean over seeds). `executed / ideal`
    is what masked dense kernels waste: N:M hardware kernels would close that gap.
    """)
    c.code('''
    phases = analysis.phase_table(runs)
    print(f"training FLOPs per phase, whole run ({analysis.FLOPS_CONVENTION})")
    print(analysis.to_markdown(phases, index=True, floatfmt=".4g", caption=False))
    ratio = analysis.executed_over_ideal(phases)
    print(analysis.to_markdown(ratio.to_frame(), index=True, floatfmt=".3f", caption=False))
    ''', "check-table")
    c.code('''
    for view in ("ideal", "executed"):
        fig = analysis.phase_breakdown(runs, view=view)
        save_figure(fig, f"phase_breakdown_{view}")
        plt.show()
    ''', "check-figure")
    c.md("""
    ## `bame flops`: per-step costs without training

    `bame flops --config FILE` measures one normal step and one adaptation step (every block a
    candidate) of the configured model and method with the same ledger (a real forward + backward on a
    random batch, scaled linearly to the config's batch), and the whole run under the config's
    schedule. First the command line on this notebook's model:
    """)
    c.code('''
    rc = bame_cli(["flops", "--config", str(CONFIG), "--set", *SETS, "method.name=bame", f"method.pattern={PATTERN}"])
    assert rc == 0
    ''')
    c.md("""
    ### The paper models

    The same measurement for the paper's models and recipes (`configs/paper/`), through
    `bame.flops_report.flops_report` (the dict `bame flops --json` prints), measured at batch 1 (MACs are linear
    in the batch). Dense comes with every report (`dense_step_macs`). Whole-run totals follow the
    config's schedule and BAME's default readings (`t_f` = 50% of training, `T` = 100, no block frozen).
    """)
    c.code('''
    from bame.flops_report import flops_report

    reports = {}
    for config in PAPER_CONFIGS:
        for pattern in PAPER_PATTERNS:
            for method in PAPER_METHODS:
                cfg = bame.load_config(ROOT / config, [f"method.name={method}", f"method.pattern={pattern}"])
                reports[(cfg.model.name, method, pattern)] = flops_report(cfg, measure_batch=1)
    costs = analysis.step_costs_table(reports.values())
    print("per-step and whole-run MACs at the config's batch (FLOPs = 2 x MACs)")
    print(analysis.to_markdown(costs, floatfmt=".4g", caption=False))
    ''', "check-table")
    c.md("### ResNet-50 at 224, 1:16: BAME vs SR-STE vs dense")
    c.code('''
    pub = analysis.load_published()
    stated = pub[(pub["method"] == "bame") & (pub["model"] == "resnet50")]["note"].tolist()
    lines = analysis.step_cost_lines(costs, "resnet50", "1:16")
    if lines:
        print("\\n".join(lines))
        print(f"published: {'; '.join(stated) or '–'} (the paper's schedule and readings are not known to us)")
    ''')
    c.code('''
    fig = analysis.step_cost_bars(costs, "resnet50", "1:16")
    save_figure(fig, "paper_step_costs")
    plt.show()
    ''', "check-figure")
    c.md("""
    ### The counts against the closed forms of docs/method.md

    For each N:M layer of ResNet-50 (1:16): `f_D` is the dense model's forward MACs and `f_S` the
    sparse forward; SR-STE must cost `2 f_S + f_D` per step, BAME `3 f_S` on a normal step and
    `2 f_S + f_D` on an adaptation step with every block a candidate.
    """)
    c.code('''
    import numpy as np

    checks = analysis.closed_form_checks(reports, "resnet50", "1:16")
    if len(checks):
        assert (checks["step"] == checks["closed form"]).all()
        assert (checks["adaptation step"] == checks["closed form (adapt)"]).all()
        assert np.allclose(checks["f_S / f_D"], 1 / 16)
        print(f"{len(checks)} layer x method checks agree with the closed forms; the first few:")
        print(analysis.to_markdown(checks.head(6), floatfmt=".4g", caption=False))
    ''', "check-table")
    return c.cells


# --------------------------------------------------------------------------------------------------
# 05 ablations

ABLATION_NOTES = {
    "lma": ("LMA score", "How a pruned weight's regrowth is scored: first-order Taylor `g_j w_j` "
            "(`taylor`, the default) or RigL-style `|g_j|` (`gradient`)."),
    "obf": ("OBF on/off", "Oscillation-aware block freezing on (`true`, the default) or off."),
    "tau": ("tau", "The frequency at which a block freezes (`f_b >= tau`, after `min_changes` changes)."),
    "block": ("Block size", "A block is `block_rows x block_groups` groups of M; selection and swaps "
              "are per block."),
    "interval": ("T (interval_steps)", "Adapt once every T steps inside `[t_i, t_f)`."),
    "regrow": ("Regrow rule", "A regrown weight starts from its stored value (`stored`) or from zero."),
    "rho": ("rho", "The fraction of a layer's blocks changed per adaptation (cosine-decayed to 0 at "
            "`t_f`)."),
}


TITLES_SOURCE = "TITLES = {" + ", ".join(f"{k!r}: {v[0]!r}" for k, v in ABLATION_NOTES.items()) + "}"


def ablations() -> list:
    c = _Cells("05")
    c.md("""
    # 05 · Ablations of BAME's readings

    The paper's full text is not available, so every detail of BAME beyond its abstract is a
    *reading*, kept as a config option under `method.bame.*` (docs/method.md). Each section below
    varies one of them over a few values and seeds against the **reference** (the base config's
    values) and the **static** mask as the control (no adaptation at all), and reports top-1 as mean
    ± std over seeds, the training FLOPs, and a plot.
    """ + MODES_MD)
    c.code(parameters('''
    FULL_CONFIG = "configs/fmnist_resnet20.yaml"
    FULL_SETS = []  # extra overrides in full mode; on a GPU e.g. ["data.train_subset=null", "train.epochs=30"]
    PATTERN = "2:4"
    # each ablation: the variants to run besides the reference; a variant is one or more overrides
    if MODE == "quick":
        SEEDS = [0, 1]
        STUDY_SETS = ["method.bame.interval_steps=1"]  # adapt every step of the (short) first half
        ABLATIONS = {
            "lma": ["method.bame.lma=gradient"],
            "obf": ["method.bame.obf=false"],
            "tau": ["method.bame.tau=0.3"],
            "block": ["method.bame.block_rows=2 method.bame.block_groups=2"],
            "interval": ["method.bame.interval_steps=4"],
            "regrow": ["method.bame.regrow=zero"],
            "rho": ["method.bame.rho=0.2"],
        }
    else:
        SEEDS = [0, 1, 2]
        STUDY_SETS = []
        ABLATIONS = {
            "lma": ["method.bame.lma=gradient"],
            "obf": ["method.bame.obf=false"],
            "tau": ["method.bame.tau=0.3", "method.bame.tau=0.8"],
            "block": ["method.bame.block_rows=2 method.bame.block_groups=2",
                      "method.bame.block_rows=4 method.bame.block_groups=1"],
            "interval": ["method.bame.interval_steps=5", "method.bame.interval_steps=80"],
            "regrow": ["method.bame.regrow=zero"],
            "rho": ["method.bame.rho=0.01", "method.bame.rho=0.2"],
        }
    '''), "parameters")
    c.code(setup("05_ablations"))
    c.md("""
    ## The reference and the control

    The reference is BAME with the base config (`STUDY_SETS` on top); the control is the static mask
    (BAME without adaptation). Both are shared by every ablation below.
    """)
    c.code(TITLES_SOURCE + "\n" + _src('''
    tables = {}  # ablation -> its table, for the summary at the end

    sweep(OUT / "reference", ["bame"], SEEDS, patterns=[PATTERN], sets=STUDY_SETS)
    sweep(OUT / "control", ["static"], SEEDS, patterns=[PATTERN], sets=STUDY_SETS)


    def ablation(name):
        """Run the variants of one ablation, then print its table and plot it against reference and control."""
        keys = analysis.ablation_keys(ABLATIONS[name])
        for variant in ABLATIONS[name]:
            sweep(OUT / name, ["bame"], SEEDS, patterns=[PATTERN], sets=[*STUDY_SETS, *variant.split()])
        parts = {"reference": analysis.load_runs(OUT / "reference"), "variant": analysis.load_runs(OUT / name),
                 "control": analysis.load_runs(OUT / "control")}
        runs = analysis.ablation_runs(parts, keys)
        table = analysis.ablation_table(runs)
        print(f"{TITLES[name]}: top-1 (%) mean ± std over seeds; training FLOPs: ideal, whole run, 2 x MACs")
        print(analysis.to_markdown(analysis.format_ablation_table(table), floatfmt=".4g", caption=False))
        fig = analysis.ablation_figure(table, runs, f"Ablation: {TITLES[name]} ({PATTERN}, {len(SEEDS)} seeds)")
        save_figure(fig, f"ablation_{name}")
        plt.show()
        return table
    '''))
    for name, (title, note) in ABLATION_NOTES.items():
        c.md(f"## {title}\n\n{note}")
        c.code(f"tables[{name!r}] = ablation({name!r})", "check-table", "check-figure")
    c.md("""
    ## All ablations at a glance

    The change of mean top-1 against the reference, per variant (points; quick mode's numbers are no
    result).
    """)
    c.code('''
    deltas = analysis.ablation_deltas(tables, TITLES)
    print(analysis.to_markdown(deltas, floatfmt=".3g", caption=False))
    fig = analysis.ablations_figure(deltas)
    save_figure(fig, "ablations_summary")
    plt.show()
    ''', "check-table", "check-figure")
    return c.cells


# --------------------------------------------------------------------------------------------------

NOTEBOOKS = {
    "01_quickstart": quickstart,
    "02_reproduce": reproduce,
    "03_mask_oscillation": mask_oscillation,
    "04_training_flops": training_flops,
    "05_ablations": ablations,
}


def build() -> dict[str, nbformat.NotebookNode]:
    """Every notebook, by file stem, outputs stripped."""
    out = {}
    for stem, make in NOTEBOOKS.items():
        nb = new_notebook(cells=make(), metadata={"kernelspec": dict(KERNELSPEC),
                                                  "language_info": {"name": "python"}})
        nbformat.validate(nb)
        out[stem] = nb
    return out


def render(nb: nbformat.NotebookNode) -> str:
    """The exact text a notebook file holds (nbformat's own serialisation, newline-terminated)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook file differs from this script")
    args = parser.parse_args(argv)
    stale = []
    for stem, nb in build().items():
        path = HERE / f"{stem}.ipynb"
        text = render(nb)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
