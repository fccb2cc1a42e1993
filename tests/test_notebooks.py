"""The notebooks: the committed .ipynb files are what notebooks/build_notebooks.py generates (outputs
stripped), and every notebook runs end to end in quick mode.

Execution uses nbclient with a kernel spec written at test time whose ``argv`` starts with this test's
own interpreter (``sys.executable``, the venv's python), found through ``JUPYTER_PATH``; so the kernel
never is whichever ``python`` happens to be first on ``PATH``. The notebooks run with
``BAME_NOTEBOOK_MODE=quick``, synthetic data (no download) and a temporary ``BAME_NOTEBOOK_RUNS``.
Cells tagged ``check-table`` must print a table and cells tagged ``check-figure`` must show a figure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import load_module

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT_S = 600  # generous: a quick-mode sweep cell takes a minute, but the machine may be shared
KERNEL_NAME = "python3"  # the kernel spec of the jupyter_path fixture (tests/conftest.py)


BUILDER = load_module(NOTEBOOK_DIR / "build_notebooks.py")
STEMS = list(BUILDER.NOTEBOOKS)


# --------------------------------------------------------------------------------------------------
# the committed files


def test_every_notebook_file_is_generated():
    on_disk = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert on_disk == sorted(STEMS), "notebooks/*.ipynb must be exactly the ones build_notebooks.py writes"


@pytest.mark.parametrize("stem", STEMS)
def test_committed_notebook_equals_the_generator(stem):
    built = BUILDER.render(BUILDER.build()[stem])
    committed = (NOTEBOOK_DIR / f"{stem}.ipynb").read_text(encoding="utf-8")
    assert committed == built, f"{stem}.ipynb is stale: run python notebooks/build_notebooks.py"


@pytest.mark.parametrize("stem", STEMS)
def test_committed_notebook_has_no_outputs(stem):
    nb = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{stem}: cell {cell.id} has outputs"


@pytest.mark.parametrize("stem", STEMS)
def test_first_cell_holds_the_parameters(stem):
    nb = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assert 'MODE = os.environ.get("BAME_NOTEBOOK_MODE", "results")' in first.source  # opens on the study
    assert "RUNS = " in first.source and "BAME_NOTEBOOK_RUNS" in first.source
    tags = {t for c in nb.cells for t in c.metadata.get("tags", [])}
    assert {"check-table", "check-figure"} <= tags, f"{stem}: no cell is checked for a table and a figure"


def test_every_quick_ablation_varies_the_current_default(monkeypatch):
    """Notebook 05's quick ablations: each variant must change the config its reference trains (this version's
    defaults under the quick config); one that does not compares the default with itself (lma=gradient did,
    after the default moved to gradient)."""
    from bame.config import load_config, to_dict

    monkeypatch.setenv("BAME_NOTEBOOK_MODE", "quick")
    nb = nbformat.read(NOTEBOOK_DIR / "05_ablations.ipynb", as_version=4)
    params: dict = {}
    exec(next(c for c in nb.cells if c.cell_type == "code").source, params)  # the parameters cell
    config = ROOT / "configs" / "notebooks" / "quick.yaml"
    reference = to_dict(load_config(config, params["STUDY_SETS"]))
    for name, variants in params["ABLATIONS"].items():
        for variant in variants:
            changed = to_dict(load_config(config, [*params["STUDY_SETS"], *variant.split()]))
            assert changed != reference, f"ablation {name}: {variant!r} is the reference (the current default)"


# --------------------------------------------------------------------------------------------------
# execution


def _text_of(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + str(data.get("text/html", "")) + str(data.get("text/markdown", ""))


def _is_table(text: str) -> bool:
    markdown = any(line.lstrip().startswith("|") and line.count("|") >= 3 for line in text.splitlines())
    return markdown or "<table" in text


def _execute(stem: str, mode: str, runs: Path, tmp_path: Path, jupyter_path: Path, monkeypatch) -> list:
    """Run notebook ``stem`` in ``mode`` with its runs and figures under ``runs``; check its tagged cells and
    its first output line (the mode and the data source); return its code cells."""
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files
    monkeypatch.setenv("BAME_NOTEBOOK_MODE", mode)
    monkeypatch.setenv("BAME_NOTEBOOK_RUNS", str(runs))
    monkeypatch.setenv("BAME_NOTEBOOK_DATA", "synthetic")
    monkeypatch.delenv("BAME_NOTEBOOK_RESULTS", raising=False)  # results mode: the committed bundle
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures

    nb = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, on the first failing cell
    print(f"{stem}: {time.perf_counter() - start:.1f} s in {mode} mode")

    cells = [c for c in nb.cells if c.cell_type == "code"]
    first_line = _text_of(cells[0].outputs[0]).splitlines()[0] if cells[0].outputs else ""
    assert first_line.startswith(f"mode {mode}: "), f"{stem}: the first cell must say its mode, not {first_line!r}"
    for cell in cells:
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        assert not errors, f"{stem} cell {cell.id}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        tags = cell.metadata.get("tags", [])
        if mode == "results" and "measure" in tags:  # measures with torch: skipped where the notebook only reads
            continue
        if "check-table" in tags:
            assert any(_is_table(_text_of(o)) for o in cell.outputs), f"{stem} cell {cell.id}: no table printed"
        if "check-figure" in tags:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
                f"{stem} cell {cell.id}: no figure shown"
    assert list((runs / stem / "figures").glob("*.png")), f"{stem}: no figure saved"
    return cells


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_runs_in_quick_mode(stem, tmp_path, jupyter_path, monkeypatch):
    runs = tmp_path / "runs"
    _execute(stem, "quick", runs, tmp_path, jupyter_path, monkeypatch)
    # the notebook trained into the runs folder it was given (and nowhere else)
    manifests = list(runs.rglob("manifest.json"))
    assert manifests, f"{stem}: no run folder under BAME_NOTEBOOK_RUNS"
    assert all((m.parent / "DONE").is_file() for m in manifests), f"{stem}: a run did not complete"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_opens_on_the_results_bundle(stem, tmp_path, jupyter_path, monkeypatch):
    """The default mode reads the committed bundle, trains nothing and writes nothing into it."""
    bundle = ROOT / BUILDER.RESULTS
    assert (bundle / "bundle.json").is_file(), f"{bundle}: the committed results bundle is missing"
    before = _tree(bundle)
    runs = tmp_path / "runs"
    cells = _execute(stem, "results", runs, tmp_path, jupyter_path, monkeypatch)
    assert BUILDER.RESULTS in _text_of(cells[0].outputs[0]), f"{stem}: the first cell must name the bundle"
    assert not list(runs.rglob("manifest.json")), f"{stem}: results mode trained something"
    assert _tree(bundle) == before, f"{stem}: results mode changed the bundle"


# --------------------------------------------------------------------------------------------------
# quick mode shows the phenomena


def test_quick_mode_flops_figure_shows_the_n_m_savings(tmp_path):
    """Notebook 04's quick runs (configs/notebooks/quick.yaml: LeNet-5-wide at 1:4, mostly N:M) must show the
    study's savings: a static mask trains for about a third of dense's FLOPs, SR-STE (dense weight gradient)
    for about half, BAME for the static mask's plus its adaptation steps (several of them), so the bars of the
    per-phase figure differ by method as they do at scale (LeNet-5, whose compute stayed dense, showed 93%)."""
    import analysis
    from bame.cli import main as bame_cli

    config = NOTEBOOK_DIR.parent / "configs" / "notebooks" / "quick.yaml"
    assert bame_cli(["sweep", "--config", str(config), "--methods", "dense,static,srste,bame", "--patterns", "1:4",
                     "--seeds", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    runs = analysis.load_runs(tmp_path)
    runs["group"] = runs["method.name"]
    bars = analysis.phase_breakdown(runs).axes[0].patches
    total = {m: sum(p.get_width() for p in bars if p.get_gid().startswith(m + "|"))
             for m in ("dense", "static", "srste", "bame")}
    x_dense = {m: total[m] / total["dense"] for m in total}
    assert 0.30 < x_dense["static"] < 0.40  # 3 f_S = 0.75 f_D per N:M layer; the stem and classifier dense
    assert 0.50 < x_dense["srste"] < 0.62  # 2 f_S + f_D = 1.5 f_D per N:M layer
    # BAME: the static mask's cost plus, on each adaptation step, the candidates' dense weight gradient (every
    # block here, so an adaptation step costs what an SR-STE step does); quick mode adapts on a quarter of its
    # steps (the study: 8 of 1404), so its bar stands further above static's than at scale, well below SR-STE's
    adaptation = analysis.load_adaptation(runs[runs["method.name"] == "bame"].iloc[0])
    adapted, steps = adaptation["step"].nunique(), int(runs["steps"].iloc[0])
    assert adapted >= 4, "quick mode must adapt several times"
    expected = x_dense["static"] + adapted / steps * (x_dense["srste"] - x_dense["static"])
    assert x_dense["bame"] == pytest.approx(expected, rel=0.01) and x_dense["bame"] < 0.75 * x_dense["srste"]
