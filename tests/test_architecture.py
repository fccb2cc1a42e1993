"""The import graph of bame/ and analysis/ (docs/architecture.md): every module sits on one layer, imports
point down or sideways only (never to a higher layer), no two modules import each other in a loop, and the
lowest layers import no torch.

Read from the code's own import statements (at any depth, ``if TYPE_CHECKING:`` blocks aside), without
running it. A new module is placed on a layer in ``LAYERS``; the test says which one it lacks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the layer of the longest prefix that names it ("bame.methods" holds
# every method; "bame$" is the package's face alone). The first three layers import no torch.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("contract", ("bame$", "bame.contract", "bame.pattern", "bame.console")),
    ("files", ("bame.files", "bame.runlock", "bame.runfolder", "bame.schema", "bame.schedule", "bame.macs",
               "bame.progress", "bame.signals", "bame.data.specs", "bame.bundle")),
    ("analysis", ("analysis",)),
    ("core", ("bame.nm", "bame.bame_core", "bame.kernels", "bame.seed", "bame.divergence", "bame.checkpoint",
              "bame.transposable", "bame.bimask_core", "bame.lbc_core", "bame.layer_patterns",
              "bame.attention_flops", "bame.nm_compressed", "bame.nm_kernels", "bame.forward_kernels",
              "bame.optim")),
    ("sparse", ("bame.autograd", "bame.layers", "bame.models", "bame.data", "bame.distributed", "bame.compress")),
    # (bame.data.cli, `bame data`, stands with its package: it needs nothing above it)
    ("parts", ("bame.flops", "bame.methods", "bame.instrument", "bame.tensorboard_sink", "bame.semistructured")),
    ("config", ("bame.config", "bame.runs")),
    ("experiment", ("bame.experiment", "bame.step", "bame.preflight", "bame.resume", "bame.sparsifier")),
    ("loop", ("bame.loop", "bame.training", "bame.integrations")),
    ("commands", ("bame.__main__", "bame.cli", "bame.sweep", "bame.inspect_runs", "bame.flops_report",
                  "bame.export", "bame.report", "bame.demo")),
]
TORCH_FREE = ("contract", "files", "analysis")


def _modules() -> dict[str, Path]:
    found = {}
    for root in ("bame", "analysis"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path) -> set[str]:
    """The modules of bame/ and analysis/ that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            exact = p.endswith("$")
            p = p.rstrip("$")
            if (module == p or (not exact and module.startswith(p + "."))) and len(p) > best:
                best, layer = len(p), i
    if layer is None:
        raise KeyError(f"{module} is on no layer: add it to LAYERS in tests/test_architecture.py "
                       f"(and to docs/architecture.md)")
    return layer


def test_every_module_is_on_a_layer():
    for module in MODULES:
        layer_of(module)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
            for a, targets in graph.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]


def test_no_import_points_up():
    assert _upward(GRAPH) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The graph the checks read is the real one, and a loop or an upward arrow added by hand is caught."""
    assert "bame.flops" in GRAPH["bame.loop"] and "bame.runfolder" in GRAPH["analysis.readers"]
    looped = {**GRAPH, "bame.contract": GRAPH["bame.contract"] | {"bame.runfolder"}}
    assert any({"bame.contract", "bame.runfolder"} <= set(c) for c in _cycles(looped))
    assert _upward({**GRAPH, "bame.methods.base": GRAPH["bame.methods.base"] | {"bame.config"}}) == [
        "bame.methods.base (parts) -> bame.config (config)"]
    with pytest.raises(KeyError, match="on no layer"):
        layer_of("bame.something_new")


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_the_lowest_layers_import_no_torch(layer):
    modules = sorted(m for m in MODULES if LAYERS[layer_of(m)][0] == layer)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", (layer, out.stdout)


def test_layers_as_documented():
    """docs/architecture.md names every layer of this test, in order (top to bottom), and draws each."""
    text = (REPO / "docs" / "architecture.md").read_text()
    positions = [text.find(f"**{name}**") for name, _ in LAYERS]
    assert -1 not in positions and positions == sorted(positions, reverse=True), positions
    drawn = [line.split()[0] for line in text.split("```")[1].strip().splitlines()]
    assert drawn == [name for name, _ in reversed(LAYERS)]
