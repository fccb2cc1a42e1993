"""Generate the notebooks of this folder (the source of truth is this file, not the .ipynb JSON).

    python notebooks/build_notebooks.py          # (re)write notebooks/*.ipynb, outputs stripped
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs from this file

Every notebook is thin: it calls ``bame`` (configs, training, the CLI) and ``analysis`` (run folders ->
tables and figures) and holds no method logic of its own. Each starts with a parameters cell (tag
``parameters``) read from the environment, which ends by saying in one line which mode it runs in and where
its data comes from:

- ``BAME_NOTEBOOK_MODE``: ``results`` (default: read the committed results bundle, train nothing),
  ``quick`` (seconds on a CPU: tiny runs of LeNet-5-wide; what CI runs) or ``full`` (train the study
  again, bundle it, read that bundle; hours on a CPU);
- ``BAME_NOTEBOOK_RESULTS``: the bundle results mode reads (default ``results/fmnist_lenet_wide_learning_blocks``), and
  ``BAME_NOTEBOOK_PART`` its folder drawn (``learn3``: 3 epochs, ``learn10``: 10 epochs);
- ``BAME_NOTEBOOK_RUNS``: where runs and figures go (a temporary folder when unset; full mode:
  ``runs/notebooks``); each notebook writes under its own sub-folder;
- ``BAME_NOTEBOOK_DATA``: quick mode's data, ``auto`` (Fashion-MNIST when ``data/`` holds it, else
  synthetic), ``synthetic`` or ``fashion-mnist``.

Cells tagged ``check-table`` / ``check-figure`` must print a table / show a figure; cells tagged ``measure``
measure with torch instead of reading runs (they say so and skip in results mode, which only reads).
``tests/test_notebooks.py`` executes every notebook in quick and in results mode and checks them.
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

MODES = ("results", "quick", "full")
# the committed results bundle results mode reads (written by `bame bundle`, see its README.md)
RESULTS = "results/fmnist_lenet_wide_learning_blocks"
# the README title of the bundle full mode writes (the committed one: `make results`)
STUDY_TITLE = "Fashion-MNIST, LeNet-5-wide: BAME whose blocks learn, against static, SR-STE and phased"


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
        self.cells.append(new_markdown_cell(_src(text).replace("__RESULTS__", RESULTS), id=self._id()))

    def code(self, text: str, *tags: str) -> None:
        metadata = {"tags": list(tags)} if tags else {}
        self.cells.append(new_code_cell(_src(text), id=self._id(), metadata=metadata))


# --------------------------------------------------------------------------------------------------
# shared cells

PARAMETERS_HEAD = r'''
# Parameters: edit here, or set the environment variables before starting Jupyter.
import os

MODE = os.environ.get("BAME_NOTEBOOK_MODE", "results")  # "results" (the committed study), "quick" (CI) or "full"
RESULTS = os.environ.get("BAME_NOTEBOOK_RESULTS", "__RESULTS__")  # the results bundle read
PART = os.environ.get("BAME_NOTEBOOK_PART", "learn3")  # the bundle's folder drawn: learn3 (3 epochs) or learn10
RUNS = os.environ.get("BAME_NOTEBOOK_RUNS") or None  # runs and figures (None: a temp folder; full: runs/notebooks)
DATA = os.environ.get("BAME_NOTEBOOK_DATA", "auto")  # quick mode: "auto", "synthetic" or "fashion-mnist"
'''

PARAMETERS_TAIL = r'''
SOURCE = {"results": f"the study's runs in the committed bundle {RESULTS}/{PART}; nothing is trained here",
          "quick": f"tiny runs trained now ({DATA} data), in seconds: they check the plumbing, their numbers are no result",
          "full": f"the study trained now into {RUNS or 'runs/notebooks'} (hours on a CPU), bundled there and read back"}
print(f"mode {MODE}: {SOURCE.get(MODE, 'unknown (MODE is results, quick or full)')}")
'''


def parameters(body: str) -> str:
    return (_src(PARAMETERS_HEAD).replace("__RESULTS__", RESULTS) + "\n" + _src(body) + "\n\n"
            + _src(PARAMETERS_TAIL))


SETUP = r'''
# Set-up: the repository root, imports, where this mode's runs come from, and small helpers.
__IMPORTS__
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "bame" / "__init__.py").is_file())
if importlib.util.find_spec("bame") is None:  # bame not installed: use this checkout
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import pandas as pd
import torch

import analysis
from bame.cli import main as bame_cli
from bame.data import verify_dataset
from bame.report import config_defaults

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar; no run here shows one

assert MODE in __MODES__, f"MODE must be 'results', 'quick' or 'full', not {MODE!r}"
RUNS = Path(RUNS or ("runs/notebooks" if MODE == "full" else tempfile.mkdtemp(prefix="bame-notebooks-")))
RUNS = RUNS if RUNS.is_absolute() else ROOT / RUNS
OUT = RUNS / "__STEM__"  # this notebook's figures (and quick mode's runs)
DEFAULTS = config_defaults()  # this version's config defaults: groups are named by what differs from them


def dataset_present(name):
    try:
        verify_dataset(name, ROOT / "data")
        return True
    except (FileNotFoundError, ValueError):
        return False


def study_bundle():
    """Full mode: train the study (scripts/study_learning_blocks.sh at 3 and 10 epochs, with its equal-FLOPs
    runs; finished runs are kept, so a second call trains only what is missing), then bundle it in RUNS/bundle."""
    script = ROOT / "scripts" / "study_learning_blocks.sh"
    env = dict(os.environ, BAME=f"{sys.executable} -m bame", EQUAL_OUT=str(RUNS / "learn_equal"))
    for part, sets in (("learn3", []), ("learn10", ["--set", "train.epochs=10"])):
        subprocess.run(["bash", str(script), str(RUNS / part), *sets], env=env, check=True)
    parts = [str(RUNS / part) for part in ("learn3", "learn10", "learn_equal")]
    assert bame_cli(["bundle", *parts, str(RUNS / "bundle"), "--title", __TITLE__]) == 0
    return RUNS / "bundle"


def study_runs():
    """Results and full mode: the study's runs, a row each (an option a run predates reads as its default),
    each named by its reading (column group)."""
    runs = analysis.fill_defaults(analysis.load_runs(STUDY), DEFAULTS)
    runs["group"] = analysis.reading_labels(runs, DEFAULTS)
    return runs


if MODE == "quick":
    torch.set_num_threads(1)  # tiny models: one thread beats several fighting over small ops
    CONFIG = ROOT / "configs" / "notebooks" / "quick.yaml"
    SETS = [f"data.root={ROOT / 'data'}"]  # overrides every run of this notebook shares
    if DATA == "auto":
        DATA = "fashion-mnist" if dataset_present("fashion-mnist") else "synthetic"
    assert DATA in ("synthetic", "fashion-mnist"), f"DATA must be 'auto', 'synthetic' or 'fashion-mnist', not {DATA!r}"
    if DATA == "fashion-mnist":  # the synthetic images' shape (28x28 grey): a tiny real subset instead
        SETS += ["data.name=fashion-mnist", "data.train_subset=1024", "data.test_subset=512"]
    print(f"config {CONFIG.relative_to(ROOT)}, overrides {SETS[1:] or 'none'}; runs and figures in {OUT}")
else:
    STUDY = (ROOT / RESULTS if MODE == "results" else study_bundle()) / PART
    if not STUDY.is_dir():
        held = sorted(p.name for p in STUDY.parent.iterdir() if p.is_dir()) if STUDY.parent.is_dir() else []
        raise FileNotFoundError(f"{STUDY}: no such folder in the bundle (it holds {held or 'nothing'}): set PART")
    print(f"the runs of {STUDY} (the bundle's README.md: how they were made); figures in {OUT}")

pd.set_option("display.width", 180)
pd.set_option("display.max_columns", 40)


def save_figure(fig, name):
    """Write the figure to OUT/figures/<name>.png (and .pdf in full mode); Jupyter shows it below the cell."""
    formats = ("png", "pdf") if MODE == "full" else ("png",)
    return analysis.save(fig, OUT / "figures" / name, formats=formats)
'''

SWEEP_HELPER = r'''
def sweep(out, methods, seeds, patterns=None, sets=()):
    """Quick mode: `bame sweep` into `out`, one run per method x pattern x seed; runs already completed there are
    skipped. The training log is printed only when something fails."""
    argv = ["sweep", "--config", str(CONFIG), "--methods", ",".join(methods),
            "--seeds", ",".join(map(str, seeds)), "--out", str(out), "--no-progress"]
    if patterns:
        argv += ["--patterns", ",".join(patterns)]
    argv += ["--set", *SETS, *sets]
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = bame_cli(argv)
    if rc != 0:
        print(log.getvalue())
        raise RuntimeError(f"bame sweep exited with {rc} (see the log above)")
    print(log.getvalue().strip().splitlines()[-1])  # 'sweep: n run, m skipped, 0 failed'
'''


def setup(stem: str, sweep: bool = True) -> str:
    """The set-up cell of notebook ``stem``; with ``sweep``, quick mode's ``sweep`` helper too."""
    modules = ["importlib.util", "os", "subprocess", "sys", "tempfile", "warnings"]
    modules += ["contextlib", "io"] if sweep else []
    imports = "\n".join(f"import {m}" for m in sorted(modules))
    text = (_src(SETUP).replace("__IMPORTS__", imports).replace("__STEM__", stem)
            .replace("__MODES__", repr(MODES)).replace("__TITLE__", repr(STUDY_TITLE)))
    if sweep:
        text += "\n\n\n" + _src(SWEEP_HELPER)
    return text


MODES_MD = """
**Modes.** `MODE = "results"` (the default) reads the committed results bundle `__RESULTS__/`
(the study of docs/results.md section 5: Fashion-MNIST, LeNet-5-wide, 3 seeds, BAME whose blocks learn
against static, SR-STE and phased; `PART` picks its 3- or 10-epoch runs)
and trains nothing: the real study's figures, in seconds. `MODE = "quick"` (what CI runs) trains tiny runs
of LeNet-5-wide, whose compute is mostly N:M, on synthetic images or a small Fashion-MNIST subset: seconds on
a CPU, numbers that check the plumbing and are no result. `MODE = "full"` trains the study again
(`scripts/study_learning_blocks.sh`; hours on a CPU, finished runs are kept), bundles it under `RUNS` and
reads that bundle. Set `BAME_NOTEBOOK_MODE` before starting Jupyter, or edit the parameters cell; the first
code cell says which mode it runs in and where its data comes from.
"""

# The study's readings, by the config values that select their runs (results and full mode).
LEARNING_BLOCKS = '''{"method.name": "bame", "method.bame.designated_grad": "window",
                   "method.bame.designation": "progressive"}'''


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
    2. trains a short BAME run through the Python API (quick mode), or takes one of the study's,
    3. inspects the run folder,
    4. plots accuracy.
    """ + MODES_MD)
    c.code(parameters('''
    PATTERN = "1:4"
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
    ## 3. A BAME run

    A config is a typed, frozen dataclass loaded from YAML plus dotted overrides; every BAME reading
    of `docs/method.md` is a field of `method.bame` (LMA score, OBF, tau, block size, T, rho, ...).
    In quick mode `bame.train` trains a short run here and writes a self-describing run folder; in results
    and full mode the run is the study's BAME run at this version's defaults (first seed), trained the same
    way by `bame sweep`, and its folder is the bundle's copy (`config.yaml`, `manifest.json`, `summary.json`,
    the tables as `.csv.gz`, thinned block snapshots, no checkpoint), which every reader takes for the run.
    """)
    c.code('''
    import yaml

    import bame
    from bame.config import to_dict

    if MODE == "quick":
        cfg = bame.load_config(CONFIG, SETS + ["method.name=bame", f"method.pattern={PATTERN}"])
        run_dir = bame.train(cfg, out_dir=OUT, progress=False).run_dir
    else:
        at_defaults = {k: v for k, v in DEFAULTS.items() if k.startswith("method.bame.")}
        choice = {"method.name": "bame", "method.pattern": PATTERN, **at_defaults}
        run_dir = Path(analysis.matching(study_runs(), choice).sort_values("train.seed").iloc[0]["path"])
        cfg = bame.load_config(run_dir / "config.yaml")
    print(yaml.safe_dump({"method": to_dict(cfg)["method"]}, sort_keys=False))
    summary = analysis.load_summary(run_dir)
    print(f"{summary['status']}: {summary['steps']} steps, test top-1 {summary['final']['test_acc']:.4f}, ideal training "
          f"FLOPs {summary['flops']['ideal_flops']:.3e} (executed {summary['flops']['executed_flops']:.3e}; FLOPs = 2 x MACs)")
    ''')
    c.md("""
    ## 4. Inspect the run folder

    The folder holds the resolved config, the manifest (git commit, versions, seeds, status), the
    metrics, the exact FLOPs ledger per epoch x layer x phase, the mask flips, BAME's adaptation log
    and per-block snapshots, and a `DONE` marker (`docs/contracts.md`). `bame inspect` summarises it;
    the `analysis` readers turn each table into a DataFrame.
    """)
    c.code('''
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
    fig = analysis.accuracy_vs_flops(run_dir)  # a folder of runs, or one run: here the one above
    save_figure(fig, "accuracy_vs_flops")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## Next

    - `02_reproduce`: BAME against the baselines, the paper table, published numbers.
    - `03_mask_oscillation`: oscillation-frequency heatmaps, frozen blocks, mask flips (SAD), OBF.
    - `04_training_flops`: the exact per-phase FLOPs ledger, ideal vs executed, the paper models' costs.
    - `05_ablations`: each reading against the current default, and the static control.

    The same from a shell: `bame train --config configs/notebooks/quick.yaml --set method.pattern=1:16`,
    `bame inspect runs/<id>`, `bame inspect __RESULTS__/learn3`.
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
    `asp` (dense, then one-shot N:M prune), `phased` (SR-STE early, then a frozen mask) and `bame`, over N:M
    patterns and seeds. Reported: top-1 as mean ± std over seeds and the exact training FLOPs of each run
    (ideal view, FLOPs = 2 x MACs).

    The paper's headline is ImageNet / ResNet-50 at 1:16. The runs here are much smaller (Fashion-MNIST,
    LeNet-5-wide); the published numbers are shown beside ours only as a reference.
    """ + MODES_MD)
    c.code(parameters('''
    # quick mode's grid (results and full mode: the study's runs)
    METHODS = ["dense", "static", "ste", "srste", "asp", "bame"]
    PATTERNS, SEEDS = ["1:4"], [0, 1]
    '''), "parameters")
    c.code(setup("02_reproduce"))
    c.md("""
    ## The runs

    Quick mode runs the grid (dense once per seed, every other method per pattern and seed) with
    `bame sweep`, the command line's own code, so re-running this cell only trains what is missing. Results
    and full mode read the study's runs; each group is named by its reading (`analysis.reading_label`).
    """)
    c.code('''
    if MODE == "quick":
        sweep(OUT, ["dense"], SEEDS)
        sweep(OUT, [m for m in METHODS if m != "dense"], SEEDS, patterns=PATTERNS)
        runs = analysis.load_runs(OUT)
        runs["group"] = analysis.reading_labels(runs, DEFAULTS)
    else:
        runs = study_runs()
    print(runs["status"].value_counts().to_dict())
    print(runs[runs["status"] == "completed"].groupby("group", sort=False)["run_id"].count().to_string())
    ''')
    c.md("""
    ## The paper table

    One row per group: top-1 mean ± std over seeds, training FLOPs (exact ledger counts, every phase), and
    their ratios to dense (the ledger's dense count where no dense run is there) and to SR-STE at the same
    pattern. Settings name what a group changed from this version's defaults.
    """)
    c.code('''
    table = analysis.paper_table(runs, reference=DEFAULTS)
    print(analysis.to_markdown(table))
    ''', "check-table")
    c.md("""
    ## Published numbers beside ours: a different scale and data set

    `analysis.load_published()` lists only figures stated verbatim in a cited source. They are
    ImageNet / ResNet-50 numbers; ours come from a small model on a small data set and a short
    schedule, BAME at this version's defaults. Compare the **sign and size of the BAME − SR-STE gap** and
    the **FLOPs ratio**, never the absolute accuracies.
    """)
    c.code('''
    pub = analysis.load_published()
    print(analysis.to_markdown(pub, floatfmt=".1f", caption=False))
    # the study's BAME at this version's defaults (quick mode's runs all use the quick config's BAME schedule)
    at_defaults = runs if MODE == "quick" else analysis.matching(
        runs, {k: v for k, v in DEFAULTS.items() if k.startswith("method.bame.")})
    side = analysis.published_comparison(analysis.paper_table(at_defaults), pub, ours=f"this notebook ({MODE} mode)")
    print(analysis.to_markdown(side, index=True, caption=False))
    print("Different data set, model, schedule and scale: the columns are not comparable number for number.")
    ''', "check-table")
    c.md("""
    ## Accuracy against training FLOPs

    First: final top-1 against the whole run's training FLOPs, one marker per group (mean ± std over
    seeds; colour: method; dashed: the Pareto front), one panel per pattern. Then: test top-1 at each
    evaluation against the cumulative training FLOPs (thin lines: runs; thick: mean over seeds with a ±1
    std band), for the groups at this version's defaults.
    """)
    c.code('''
    points = analysis.run_points(runs)
    points["group"] = points["run_id"].map(runs.set_index("run_id")["group"])
    for pattern in sorted(set(points["pattern"]) - {"dense"}):
        fig = analysis.pareto_scatter(points[points["pattern"].isin([pattern, "dense"])], legend="groups",
                                      title=f"Final top-1 against training FLOPs, {pattern}")
        save_figure(fig, f"final_accuracy_vs_flops_{pattern.replace(':', 'of')}")
        plt.show()
    ''', "check-figure")
    c.code('''
    fig = analysis.accuracy_vs_flops(at_defaults)
    save_figure(fig, "accuracy_vs_flops")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## A report to keep

    `bame report DIR` (the Python side: `bame.report.write_report`) writes the tables, every figure (PNG +
    PDF), each group's run ids and commands and the published numbers as one markdown file (`.html` too:
    `--out report.html`); here into this notebook's output folder, never into the bundle.
    """)
    c.code('''
    from bame.report import write_report

    report = write_report(OUT if MODE == "quick" else STUDY, OUT / "report" / "report.md",
                          title=f"BAME vs baselines ({MODE} mode)")
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

    This notebook shows, for BAME under several OBF settings (quick mode: `obf: true` and `false`; the
    study: blocks that learn, re-chosen every step, frozen at `tau` 0.5 (the default), 0.2 and 0.1):
    per-layer heatmaps of `f_b` over adaptation steps, the fraction of frozen blocks over time, and the
    mask flips per step (SAD) of the masked methods.
    """ + MODES_MD)
    c.code(parameters('''
    if MODE == "quick":
        PATTERN, SEEDS = "1:4", [0, 1]
        METHODS = ["static", "ste", "srste"]  # the baselines whose mask flips (SAD) are compared with BAME's
        # 32 steps; adapt every step in the first half, with a rho and tau that let blocks freeze that soon
        STUDY_SETS = ["train.epochs=4", "method.bame.interval_steps=1", "method.bame.rho=0.3",
                      "method.bame.tau=0.3"]
        OBF_FAMILY, OBF_KEYS = {"method.name": "bame"}, ["method.bame.obf"]  # BAME with OBF on and off
        COMPARED = [{"method.name": m} for m in METHODS] + [{"method.name": "bame", "method.bame.obf": True}]
    else:
        PATTERN = "1:16"
        # blocks that learn, re-chosen every step until t_f = 0.5, with OBF freezing at three thresholds
        OBF_FAMILY = {**__LEARNING_BLOCKS__, "method.bame.regrow_rule": "magnitude", "method.bame.interval_steps": 1,
                      "method.bame.t_f_fraction": 0.5}
        OBF_KEYS = ["method.bame.tau", "method.bame.beta", "method.bame.min_changes"]
        # the groups whose mask flips are drawn: the controls, BAME at the defaults, blocks that learn (t_f 0.27)
        COMPARED = [{"method.name": "static"}, {"method.name": "srste"},
                    {"method.name": "phased", "method.phased.switch_fraction": 0.27},
                    {"method.name": "bame", "method.bame.designated_grad": "adaptation"},
                    {**__LEARNING_BLOCKS__, "method.bame.regrow_rule": "magnitude", "method.bame.interval_steps": 1,
                     "method.bame.t_f_fraction": 0.27, "method.bame.tau": 0.5}]
    '''.replace("__LEARNING_BLOCKS__", LEARNING_BLOCKS)), "parameters")
    c.code(setup("03_mask_oscillation"))
    c.md("## Runs: BAME under each OBF setting, and the masked baselines")
    c.code('''
    if MODE == "quick":
        for obf in ("true", "false"):
            sweep(OUT, ["bame"], SEEDS, patterns=[PATTERN], sets=[*STUDY_SETS, f"method.bame.obf={obf}"])
        sweep(OUT, METHODS, SEEDS, patterns=[PATTERN], sets=STUDY_SETS)
        runs = analysis.load_runs(OUT)
        runs["group"] = analysis.reading_labels(runs, DEFAULTS)
    else:
        runs = study_runs()
    runs = runs[(runs["status"] == "completed") & (runs["method.pattern"] == PATTERN)]
    obf_runs = analysis.matching(runs, OBF_FAMILY)
    compared = pd.concat([analysis.matching(runs, which) for which in COMPARED])
    print("OBF settings:", obf_runs.groupby("group", sort=False)["run_id"].count().to_dict())
    print("compared:", compared.groupby("group", sort=False)["run_id"].count().to_dict())
    ''')
    c.md("""
    ## Per-layer oscillation-frequency heatmaps

    One panel per N:M layer: x = adaptation step (a snapshot; the bundle keeps at most 12 per run, the
    first, the last and evenly spaced between), y = block (sorted by final `f_b`, binned when there are
    many). Where OBF freezes, blocks that keep oscillating stop once `f_b >= tau`; with OBF off nothing
    stops them.
    """)
    c.code('''
    for group, g in obf_runs.groupby("group", sort=False):
        run = g.sort_values("train.seed").iloc[0]
        fig = analysis.oscillation_heatmaps(run)
        fig.suptitle(f"{group}\\n{run['run_id']}", fontsize=10)
        save_figure(fig, "oscillation_" + "_".join(f"{k.rsplit('.', 1)[-1]}{run[k]}" for k in OBF_KEYS))
        plt.show()
    ''', "check-figure")
    c.md("## Fraction of frozen blocks over time")
    c.code('''
    fig = analysis.frozen_fraction(obf_runs)
    save_figure(fig, "frozen_fraction")
    plt.show()
    ''', "check-figure")
    c.md("""
    ## Mask flips per step (SAD) per method

    SAD counts the mask entries a step changed, over all N:M weights. STE and SR-STE recompute the
    mask from `|W|` every step; static never changes it; phased does what SR-STE does until its switch,
    then nothing; BAME changes it only on adaptation steps, inside the selected blocks, and not at all
    after `t_f`. The counts are drawn on a linear axis from 0.
    """)
    c.code('''
    # one figure per comparison: the masked methods, then BAME under each OBF setting
    for subset, name in ((compared, "methods"), (obf_runs, "obf")):
        for value in ("flip_fraction", "cumulative"):
            fig = analysis.mask_flips(subset, value=value)
            save_figure(fig, f"mask_flips_{name}_{value}")
            plt.show()
    ''', "check-figure")
    c.md("""
    ## OBF settings: numbers

    Per run: total mask flips, oscillation events (A → B → A returns), the fraction of blocks frozen at
    the last adaptation step, and final top-1; then mean ± std over seeds per group.
    """)
    c.code('''
    stats = analysis.mask_stats(obf_runs)
    summary = analysis.mean_std_table(stats, "group", analysis.MASK_STAT_DIGITS)
    print(analysis.to_markdown(summary, index=True, caption=False))
    ''', "check-table")
    c.md("""
    ## Where the frozen blocks are

    The last block snapshot of the run that froze most, per layer: how many blocks changed, their mean
    frequency and the share frozen.
    """)
    c.code('''
    run = obf_runs.iloc[stats["frozen at last adaptation (%)"].fillna(-1).to_numpy().argmax()]
    found = analysis.block_summary(run)
    if found is None:
        print(f"{run['run_id']} saved no block snapshot (instrument.block_state_every_adaptations)")
    else:
        step, per_layer = found
        print(f"snapshot at step {step} of {run['run_id']} ({run['group']})")
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
    `f_D` on adaptation steps (docs/method.md). LeNet-5-wide's hidden layers are all N:M, so at 1:4 a
    static mask trains for about a third of dense's FLOPs and at 1:16 for about a fifth.
    """ + MODES_MD)
    c.code(parameters('''
    METHODS = ["dense", "static", "ste", "srste", "asp", "bame"]  # quick mode's runs, at PATTERN
    PATTERN = "1:4" if MODE == "quick" else "1:16"
    SEEDS = [0]  # quick mode (results and full: the study's seeds)
    # the paper models, measured with `bame flops` (a forward + backward per step kind of ResNet-50 at 224: about
    # a minute on a CPU, so not in results mode, which only reads; set PAPER_FLOPS = True to measure there too)
    PAPER_FLOPS = MODE != "results"
    PAPER_CONFIGS = ["configs/paper/imagenet_resnet50.yaml"]
    if MODE == "full":
        PAPER_CONFIGS += ["configs/paper/imagenet_resnet18.yaml", "configs/paper/cifar10_resnet32.yaml",
                          "configs/paper/cifar10_mobilenet_v2.yaml"]
        PAPER_METHODS, PAPER_PATTERNS = ["static", "ste", "srste", "asp", "bame"], ["2:4", "1:4", "2:8", "1:16"]
    else:
        PAPER_METHODS, PAPER_PATTERNS = ["srste", "bame"], ["1:16"]  # dense: every report measures it
    '''), "parameters")
    c.code(setup("04_training_flops"))
    c.md("## Runs: every method at one pattern")
    c.code('''
    if MODE == "quick":
        sweep(OUT, ["dense"], SEEDS)
        sweep(OUT, [m for m in METHODS if m != "dense"], SEEDS, patterns=[PATTERN])
        runs = analysis.load_runs(OUT)
        runs["group"] = analysis.reading_labels(runs, DEFAULTS)
    else:
        runs = study_runs()
    runs = runs[(runs["status"] == "completed") & ((runs["method.pattern"] == PATTERN) | (runs["method.name"] == "dense"))]
    print(runs.groupby("group", sort=False)["run_id"].count().to_dict())
    ''')
    c.md("""
    ## Per-phase breakdown per method, ideal vs executed

    Whole-run training FLOPs per phase from each run's `flops.csv` (mean over seeds), and the total as a
    fraction of dense training (the dense run's, or the ledger's dense count for the same steps).
    `executed / ideal` is what masked dense kernels waste: N:M hardware kernels would close that gap.
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
    schedule. First the command line on the model of this notebook's runs:
    """)
    c.code('''
    if not PAPER_FLOPS:
        print("measurements skipped (PAPER_FLOPS = False: results mode only reads the bundle)")
    else:
        config = CONFIG if MODE == "quick" else Path(runs.iloc[0]["path"]) / "config.yaml"
        sets = SETS if MODE == "quick" else [f"data.root={ROOT / 'data'}"]
        assert bame_cli(["flops", "--config", str(config), "--set", *sets, "method.name=bame",
                         f"method.pattern={PATTERN}"]) == 0
    ''', "measure")
    c.md("""
    ### The paper models

    The same measurement for the paper's models and recipes (`configs/paper/`), through
    `bame.flops_report.flops_report` (the dict `bame flops --json` prints), measured at batch 1 (MACs are linear
    in the batch). Dense comes with every report (`dense_step_macs`). Whole-run totals follow the
    config's schedule and BAME's default readings (`t_f` = 50% of training, `T` = 100, no block frozen).
    """)
    c.code('''
    import bame
    from bame.flops_report import flops_report

    reports = {}
    for config in PAPER_CONFIGS if PAPER_FLOPS else []:
        for pattern in PAPER_PATTERNS:
            for method in PAPER_METHODS:
                cfg = bame.load_config(ROOT / config, [f"method.name={method}", f"method.pattern={pattern}"])
                reports[(cfg.model.name, method, pattern)] = flops_report(cfg, measure_batch=1)
    if reports:
        costs = analysis.step_costs_table(reports.values())
        print("per-step and whole-run MACs at the config's batch (FLOPs = 2 x MACs)")
        print(analysis.to_markdown(costs, floatfmt=".4g", caption=False))
    ''', "check-table", "measure")
    c.md("### ResNet-50 at 224, 1:16: BAME vs SR-STE vs dense")
    c.code('''
    pub = analysis.load_published()
    stated = pub[(pub["method"] == "bame") & (pub["model"] == "resnet50")]["note"].tolist()
    lines = analysis.step_cost_lines(costs, "resnet50", "1:16") if reports else []
    if lines:
        print("\\n".join(lines))
        print(f"published: {'; '.join(stated) or '–'} (the paper's schedule and readings are not known to us)")
    ''')
    c.code('''
    if reports:
        fig = analysis.step_cost_bars(costs, "resnet50", "1:16")
        save_figure(fig, "paper_step_costs")
        plt.show()
    ''', "check-figure", "measure")
    c.md("""
    ### The counts against the closed forms of docs/method.md

    For each N:M layer of ResNet-50 (1:16): `f_D` is the dense model's forward MACs and `f_S` the
    sparse forward; SR-STE must cost `2 f_S + f_D` per step, BAME `3 f_S` on a normal step and
    `2 f_S + f_D` on an adaptation step with every block a candidate.
    """)
    c.code('''
    import numpy as np

    checks = analysis.closed_form_checks(reports, "resnet50", "1:16") if reports else []
    if len(checks):
        assert (checks["step"] == checks["closed form"]).all()
        assert (checks["adaptation step"] == checks["closed form (adapt)"]).all()
        assert np.allclose(checks["f_S / f_D"], 1 / 16)
        print(f"{len(checks)} layer x method checks agree with the closed forms; the first few:")
        print(analysis.to_markdown(checks.head(6), floatfmt=".4g", caption=False))
    ''', "check-table", "measure")
    return c.cells


# --------------------------------------------------------------------------------------------------
# 05 ablations

ABLATION_NOTES = {
    # quick mode: each swept against the reference (the quick config at this version's defaults, T = 1)
    "lma": ("LMA score", "How a pruned weight's regrowth is scored: RigL-style `|g_j|` (`gradient`, the "
            "default) or first-order Taylor `g_j w_j` (`taylor`)."),
    "obf": ("OBF on/off", "Oscillation-aware block freezing on (`true`, the default) or off."),
    "tau": ("OBF threshold tau", "The frequency at which a block freezes (`f_b >= tau`, after `min_changes` "
            "changes; default 0.5)."),
    "block": ("Block size", "A block is `block_rows x block_groups` groups of M; selection and swaps are per "
              "block."),
    "interval": ("T (interval_steps)", "Adapt (or re-choose) once every T steps inside `[t_i, t_f)`; default 100."),
    "regrow": ("Regrow value", "A regrown weight starts from its stored value (`stored`, the default) or from "
               "zero."),
    "rho": ("rho", "The fraction of a layer's blocks changed per adaptation (default 0.0125, cosine-decayed "
            "to 0 at `t_f`)."),
    # results and full mode: read from the study's families of blocks that learn
    "regrow_rule": ("Re-choice rule", "How the blocks that learn re-choose their mask: the best LMA swap "
                    "(`lma`, the default) or the top-N `|W|` of each group (`magnitude`)."),
    "t_f": ("Window end t_f (the budget)", "Blocks learn until `t_f`; the FLOPs budget (default 0.5)."),
}


def ablations() -> list:
    c = _Cells("05")
    c.md("""
    # 05 · Ablations of BAME's readings

    The paper's full text is not available, so every detail of BAME beyond its abstract is a
    *reading*, kept as a config option under `method.bame.*` (docs/method.md). Each ablation below
    compares the **current default** of a few options (the reference) with alternatives, over seeds, and
    the **static** mask as the control (no adaptation at all); it reports top-1 as mean ± std over seeds,
    the training FLOPs, and a plot. A variant equal to the reference is refused (an ablation that compared
    the default with itself, after the default moved, would say nothing).

    Quick mode sweeps each variant against the quick config (this version's defaults, but `T = 1`); results
    and full mode read them from the study's families of blocks that learn, the group at the current
    defaults being the reference.
    """ + MODES_MD)
    c.code(parameters('''
    if MODE == "quick":
        PATTERN, SEEDS = "1:4", [0, 1]
        STUDY_SETS = ["method.bame.interval_steps=1"]  # adapt every step of the (short) first half
        # each ablation: the variants swept besides the reference; a variant is one or more overrides
        ABLATIONS = {
            "lma": ["method.bame.lma=taylor"],
            "obf": ["method.bame.obf=false"],
            "tau": ["method.bame.tau=0.3"],
            "block": ["method.bame.block_rows=2 method.bame.block_groups=2"],
            "interval": ["method.bame.interval_steps=4"],
            "regrow": ["method.bame.regrow=zero"],
            "rho": ["method.bame.rho=0.2"],
        }
    else:
        PATTERN = "1:16"
        # each ablation: (the family of the study's runs, the keys its runs differ in); the reference is the
        # family's group at the current defaults of those keys
        LEARN = __LEARNING_BLOCKS__
        MAGNITUDE = {**LEARN, "method.bame.regrow_rule": "magnitude"}
        OBF_AT_DEFAULTS = {"method.bame.tau": 0.5, "method.bame.beta": 0.9, "method.bame.min_changes": 2}
        ABLATIONS = {
            "interval": ({**MAGNITUDE, "method.bame.t_f_fraction": 0.27, **OBF_AT_DEFAULTS}, ["method.bame.interval_steps"]),
            "regrow_rule": ({**LEARN, "method.bame.interval_steps": 100, "method.bame.t_f_fraction": 0.27},
                            ["method.bame.regrow_rule"]),
            "t_f": ({**MAGNITUDE, "method.bame.interval_steps": 1, **OBF_AT_DEFAULTS}, ["method.bame.t_f_fraction"]),
            "tau": ({**MAGNITUDE, "method.bame.interval_steps": 1, "method.bame.t_f_fraction": 0.5},
                    ["method.bame.tau", "method.bame.beta", "method.bame.min_changes"]),
        }
    '''.replace("__LEARNING_BLOCKS__", LEARNING_BLOCKS)), "parameters")
    c.code(setup("05_ablations"))
    c.md("""
    ## The reference and the control

    Quick mode: the reference is BAME with the quick config (`STUDY_SETS` on top); the control is the static
    mask. Both are shared by every ablation. Results and full mode: the reference is the study's group at the
    current defaults of the keys varied, the control the study's static runs.
    """)
    c.code('''
    TITLES = __TITLES__
    tables = {}  # ablation -> its table, for the summary at the end

    if MODE == "quick":
        sweep(OUT / "reference", ["bame"], SEEDS, patterns=[PATTERN], sets=STUDY_SETS)
        sweep(OUT / "control", ["static"], SEEDS, patterns=[PATTERN], sets=STUDY_SETS)
    else:
        study = study_runs()
        study = study[study["method.pattern"] == PATTERN]


    def ablation_runs(name):
        """The runs of one ablation (quick mode: swept now) with their role and setting."""
        if MODE != "quick":
            family, keys = ABLATIONS[name]
            return analysis.study_ablation_runs(study, family, keys, DEFAULTS)
        keys = analysis.ablation_keys(ABLATIONS[name])
        for variant in ABLATIONS[name]:
            sweep(OUT / name, ["bame"], SEEDS, patterns=[PATTERN], sets=[*STUDY_SETS, *variant.split()])
        parts = {"reference": analysis.load_runs(OUT / "reference"), "variant": analysis.load_runs(OUT / name),
                 "control": analysis.load_runs(OUT / "control")}
        return analysis.ablation_runs(parts, keys)


    def ablation(name):
        """One ablation: its table, printed, and its figure against the reference and the control."""
        runs = ablation_runs(name)
        table = analysis.ablation_table(runs)
        print(f"## {TITLES[name][0]}\\n{TITLES[name][1]}\\n")
        print("top-1 (%) mean ± std over seeds; training FLOPs: ideal, whole run, 2 x MACs")
        print(analysis.to_markdown(analysis.format_ablation_table(table), floatfmt=".4g", caption=False))
        seeds = runs.loc[runs["role"] == "reference", "train.seed"].nunique()
        fig = analysis.ablation_figure(table, runs, f"Ablation: {TITLES[name][0]} ({PATTERN}, {seeds} seeds)")
        save_figure(fig, f"ablation_{name}")
        plt.show()
        return table
    '''.replace("__TITLES__", "{" + ", ".join(f"{k!r}: {v!r}" for k, v in ABLATION_NOTES.items()) + "}"))
    c.md("## Each ablation")
    c.code('''
    for name in ABLATIONS:
        try:
            tables[name] = ablation(name)
        except LookupError as missing:  # the study has no run at the current default, or no alternative
            print(f"## {TITLES[name][0]}: not in these runs: {missing}\\n")
    ''', "check-table", "check-figure")
    c.md("""
    ## All ablations at a glance

    The change of mean top-1 against the reference, per variant (points; quick mode's numbers are no
    result).
    """)
    c.code('''
    deltas = analysis.ablation_deltas(tables, {k: v[0] for k, v in TITLES.items()})
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
