"""Deployment of trained N:M masks: the export file and ``bame export``.

The layers' weights are stored in the compressed N:M format of ``bame.compress`` (values plus uint8
in-group indices; format version 1). 2:4 inference on CUDA is ``bame.semistructured``; its names are
re-exported here with the format's, so ``from bame.export import compress, to_semi_structured`` works.

The export file
---------------
:func:`export_model` / :func:`export_state_dict` give a plain dict (tensors, strings, ints, lists;
loadable with ``torch.load(weights_only=True)``)::

    format          "bame.nm_export"
    format_version  1
    pattern, layout the pattern / layout shared by every N:M layer (None when they differ)
    keys            every key of the dense-equivalent state dict, in order
    nm_layers       {layer name: {values, indices, shape, pattern, layout}}
    dense           {key: tensor} for every other parameter and buffer (biases, BN statistics, ...)
    source          (``bame export RUN_DIR`` only) {run_id, status, step}: the run's status when exported
                    and the step of its checkpoint (an interrupted or failed run exports its last checkpoint)

An N:M layer's ``weight``, ``mask`` and ``grad_mask`` (a training-only buffer) are replaced by its
compressed entry. :func:`load_export` gives back the state dict of the *dense* model with the same
architecture, weights already masked, so ``dense_model.load_state_dict(load_export(path))`` computes
what the masked N:M model computes.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint_file
from .compress import NMCompressed, compress, compressed_nbytes, compression_ratio, decompress, dense_nbytes
from .console import EXIT_USAGE, error, warning
from .contract import CHECKPOINT, COMPLETED
from .divergence import nonfinite_entries
from .layers import nm_layers
from .nm import Layout, NMPattern
from .runfolder import RunFolder, RunFolderError
from .semistructured import (SemiStructuredConv2d, SemiStructuredLinear, SemiStructuredReport, gemm_weight,
                             semi_structured_skip_reason, to_semi_structured)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExportSummary",
    "LayerSize",
    "NMCompressed",
    "SemiStructuredConv2d",
    "SemiStructuredLinear",
    "SemiStructuredReport",
    "add_export_parser",
    "cli_export",
    "compress",
    "compressed_nbytes",
    "compression_ratio",
    "decompress",
    "dense_nbytes",
    "export_model",
    "export_run",
    "export_state_dict",
    "gemm_weight",
    "load_export",
    "save_export",
    "semi_structured_skip_reason",
    "to_semi_structured",
]

FORMAT = "bame.nm_export"
FORMAT_VERSION = 1
DEFAULT_EXPORT_PATH = Path("export") / "model_nm.pt"  # relative to the run folder


# --------------------------------------------------------------------------------------------------
# Export of a model or a state dict
# --------------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nm_prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes ``'<layer>.'`` (or ``''``) of N:M layers: a ``mask`` entry next to a same-shape ``weight``."""
    out = []
    for key, value in state.items():
        if key == "mask" or key.endswith(".mask"):
            prefix = key[: -len("mask")]
            weight = state.get(prefix + "weight")
            if weight is not None and tuple(weight.shape) == tuple(value.shape):
                out.append(prefix)
    return out


def _build_export(state: Mapping[str, torch.Tensor],
                  patterns: Mapping[str, tuple[NMPattern, Layout]]) -> dict:
    """``patterns`` maps each N:M prefix to its pattern and layout."""
    layers: dict[str, dict] = {}
    dense: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    replaced = {p + suffix for p in patterns for suffix in ("weight", "mask", "grad_mask")}
    for key, value in state.items():
        if key not in replaced:
            dense[key] = value.detach().cpu()
            keys.append(key)
            continue
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        if key == prefix + "weight":
            pattern, layout = patterns[prefix]
            name = prefix[:-1]
            try:
                c = compress(state[prefix + "weight"].detach().cpu(), state[prefix + "mask"].cpu(), pattern, layout)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            layers[name] = c.to_dict()
            keys.append(key)
    kinds = {(str(p), lay.value) for p, lay in patterns.values()}
    common = next(iter(kinds)) if len(kinds) == 1 else (None, None)
    return dict(format=FORMAT, format_version=FORMAT_VERSION, pattern=common[0], layout=common[1],
                keys=keys, nm_layers=layers, dense=dense)


def export_state_dict(state: Mapping[str, torch.Tensor], pattern: NMPattern | str | Mapping[str, NMPattern | str],
                      layout: Layout | str = Layout.ROW) -> dict:
    """Export a state dict holding N:M layers (found by their ``<name>.mask`` entries), all of ``pattern``, or
    each of its own when ``pattern`` maps layer names to patterns (a run with per-layer patterns)."""
    layout = Layout.parse(layout)
    prefixes = _nm_prefixes(state)
    if not isinstance(pattern, Mapping):
        return _build_export(state, {p: (NMPattern.parse(pattern), layout) for p in prefixes})
    missing = [p[:-1] for p in prefixes if p[:-1] not in pattern]
    if missing:
        raise ValueError(f"no pattern for the N:M layer {missing[0]!r} (patterns given for {sorted(pattern)})")
    return _build_export(state, {p: (NMPattern.parse(pattern[p[:-1]]), layout) for p in prefixes})


def export_model(model: nn.Module) -> dict:
    """Export ``model``: every N:M layer compressed with its own pattern and layout, the rest dense."""
    patterns = {(name + "." if name else ""): (layer.pattern, layer.layout) for name, layer in nm_layers(model)}
    return _build_export(model.state_dict(), patterns)


def _write_new(path: Path, obj: object) -> None:
    """``torch.save`` to a file that must not exist yet (exclusive create; no partial file on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as f:
            try:
                torch.save(obj, f)
            except BaseException:
                f.close()
                path.unlink(missing_ok=True)
                raise
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None


def save_export(path: str | Path, model_or_state: nn.Module | Mapping[str, torch.Tensor], *,
                pattern: NMPattern | str | None = None, layout: Layout | str = Layout.ROW,
                overwrite: bool = False) -> dict:
    """Write the export of a model (or of a state dict with masks, then ``pattern`` is required) to ``path``.

    Refuses to replace an existing file unless ``overwrite``. Returns the exported dict.
    """
    if isinstance(model_or_state, nn.Module):
        exported = export_model(model_or_state)
    else:
        if pattern is None:
            raise ValueError("save_export of a state dict needs pattern= (e.g. '2:4'): a state dict does not "
                             "record its N:M pattern")
        exported = export_state_dict(model_or_state, pattern, layout)
    path = Path(path)
    if overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(exported, path)
    else:
        _write_new(path, exported)
    return exported


def load_export(path_or_export: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """The dense-equivalent state dict (masked weights, no mask buffers) of an export file or dict."""
    if isinstance(path_or_export, Mapping):
        exported = path_or_export
    else:
        exported = torch.load(path_or_export, map_location="cpu", weights_only=True)
    if not isinstance(exported, Mapping) or exported.get("format") != FORMAT:
        raise ValueError(f"{path_or_export if not isinstance(path_or_export, Mapping) else 'dict'} is not a "
                         f"{FORMAT} file")
    version = exported.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"export format version {version} is not supported (this bame reads {FORMAT_VERSION})")
    dense = exported["dense"]
    weights = {(name + "." if name else "") + "weight": decompress(NMCompressed.from_dict(entry, name))
               for name, entry in exported["nm_layers"].items()}
    out: dict[str, torch.Tensor] = {}
    for key in exported["keys"]:
        out[key] = weights[key] if key in weights else dense[key]
    return out


# --------------------------------------------------------------------------------------------------
# `bame export RUN_DIR`
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSize:
    name: str
    shape: tuple[int, ...]
    pattern: str
    layout: str
    dense_bytes: int
    compressed_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes


@dataclass
class ExportSummary:
    """What an export holds and how much it saves (bytes of tensors; file overhead not counted)."""

    path: Path | None
    layers: list[LayerSize] = field(default_factory=list)
    other_bytes: int = 0  # every parameter / buffer kept dense
    source: dict | None = None  # export_run: {run_id, status, step} of the run and its checkpoint
    warning: str | None = None  # export_run: why these weights may not be the run's final ones

    @property
    def nm_dense_bytes(self) -> int:
        return sum(s.dense_bytes for s in self.layers)

    @property
    def nm_compressed_bytes(self) -> int:
        return sum(s.compressed_bytes for s in self.layers)

    @property
    def total_dense_bytes(self) -> int:
        return self.nm_dense_bytes + self.other_bytes

    @property
    def total_compressed_bytes(self) -> int:
        return self.nm_compressed_bytes + self.other_bytes

    @classmethod
    def of(cls, exported: Mapping, path: Path | None = None) -> ExportSummary:
        layers = []
        for name, entry in exported["nm_layers"].items():
            c = NMCompressed.from_dict(entry, name)
            layers.append(LayerSize(name, c.shape, str(c.pattern), c.layout.value, c.dense_nbytes, c.nbytes))
        return cls(path, layers, sum(_nbytes(t) for t in exported["dense"].values()))

    def __str__(self) -> str:
        def ratio(a: int, b: int) -> str:
            return f"{a / b:.2f}x" if b else "-"
        lines = [f"{len(self.layers)} N:M layers" + (f" -> {self.path}" if self.path else "")]
        if self.source:
            lines.append(f"from run {self.source['run_id']} ({self.source['status']}), checkpoint at step "
                         f"{self.source['step']}")
        for s in self.layers:
            lines.append(f"  {s.name:<40} {'x'.join(map(str, s.shape)):<16} {s.pattern:>5} {s.layout:<7} "
                         f"{s.dense_bytes:>12,} -> {s.compressed_bytes:>12,} B  ({s.ratio:.2f}x)")
        lines.append(f"N:M weights: {self.nm_dense_bytes:,} B dense -> {self.nm_compressed_bytes:,} B compressed "
                     f"({ratio(self.nm_dense_bytes, self.nm_compressed_bytes)})")
        lines.append(f"whole model: {self.total_dense_bytes:,} B dense -> {self.total_compressed_bytes:,} B "
                     f"({ratio(self.total_dense_bytes, self.total_compressed_bytes)}; "
                     f"{self.other_bytes:,} B kept dense)")
        return "\n".join(lines)


def _manifest(folder: RunFolder) -> dict:
    """The run's manifest.json ({} without a readable one: the export warns that it cannot tell the status)."""
    try:
        return folder.manifest
    except RunFolderError:
        return {}


def _status_warning(run_dir: Path, manifest: dict, step: object, done: bool) -> str | None:
    """Why the checkpoint's weights may not be a finished run's model (None when they are)."""
    status = manifest.get("status", "unknown")
    last = (manifest.get("resumes") or [{}])[-1]
    if status == COMPLETED and done and last.get("status", COMPLETED) != COMPLETED:
        return (f"run {run_dir.name} completed at step {last.get('from_step')}, but its extension "
                f"{last.get('status')}: the checkpoint is at step {step}, not the completed run's model")
    if status == COMPLETED and done:
        return None
    if not manifest:
        return f"{run_dir} has no readable manifest.json: cannot tell whether the run completed (checkpoint at step {step})"
    return (f"run {run_dir.name} is {status}, not completed: exporting its last checkpoint, at step {step}, "
            f"which is not a finished run's model")


def export_run(run_dir: str | Path, out: str | Path | None = None) -> ExportSummary:
    """Export ``RUN_DIR/checkpoints/last.pt`` to ``out`` (default ``RUN_DIR/export/model_nm.pt``).

    Raises ``FileNotFoundError`` for a missing run folder / checkpoint / config, ``FileExistsError``
    when the output exists, ``ValueError`` for masks that break the run's pattern.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    folder = RunFolder(run_dir, need_manifest=False)
    ckpt_path = folder.checkpoint_path
    if ckpt_path is None:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT} not found: the run has no checkpoint (did it save one?)")
    out_path = Path(out) if out is not None else run_dir / DEFAULT_EXPORT_PATH
    if out_path.exists():
        raise FileExistsError(f"{out_path} already exists; not overwriting it: remove it or pass --out FILE")
    pattern, layout = folder.nm_pattern()
    per_layer = folder.layer_patterns()  # each layer's own (per-layer patterns); {} for an older folder
    ckpt = load_checkpoint_file(ckpt_path)  # weights_only: nothing in the file runs
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        state = ckpt["model"]
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt  # a bare state dict
    else:
        raise ValueError(f"{ckpt_path}: expected a dict with a 'model' state dict (docs/contracts.md)")
    bad = nonfinite_entries(state)
    if bad:
        raise ValueError(f"{ckpt_path}: refusing to export non-finite weights (NaN or inf in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the run diverged before this checkpoint")
    manifest, step = _manifest(folder), ckpt.get("step") if isinstance(ckpt.get("step"), int) else None
    source = {"run_id": run_dir.resolve().name, "status": manifest.get("status", "unknown"), "step": step}
    exported = {**export_state_dict(state, per_layer or pattern, layout), "source": source}
    try:
        _write_new(out_path, exported)
    except FileExistsError:
        raise FileExistsError(f"{out_path} already exists; not overwriting it: remove it or pass --out FILE") from None
    summary = ExportSummary.of(exported, out_path)
    summary.source = source
    summary.warning = _status_warning(run_dir, manifest, step, folder.done)
    return summary


def cli_export(args: argparse.Namespace) -> int:
    """Handler of ``bame export RUN_DIR [--out FILE]``: prints the summary and returns 0, or prints
    ``bame: error: ...`` to stderr and returns 2 (the CLI's usage-error status) for a missing run folder,
    checkpoint or config, an existing output file, or masks that break the run's pattern."""
    try:
        summary = export_run(args.run_dir, getattr(args, "out", None))
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        error(str(err))
        return EXIT_USAGE
    if summary.warning:
        warning(summary.warning)
    print(summary)
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` to a ``bame`` sub-command parser; sets ``func=cli_export``."""
    p = subparsers.add_parser(
        "export", help="write a run's N:M layers in compressed form (values + in-group indices)",
        description="Compress the N:M layers of RUN_DIR/checkpoints/last.pt (pattern and layout from "
                    "RUN_DIR/config.yaml) into an export file; load it with bame.export.load_export.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    p.add_argument("--out", metavar="FILE", default=None,
                   help=f"output file (default RUN_DIR/{DEFAULT_EXPORT_PATH.as_posix()}); never overwritten")
    p.set_defaults(func=cli_export)
    return p
