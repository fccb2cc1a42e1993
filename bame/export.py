"""Deployment of trained N:M masks: a compressed file format, ``bame export``, and 2:4 GPU inference.

The compressed N:M format (format version 1)
--------------------------------------------
A weight ``W[Cout, ...]`` with an N:M mask is grouped by the package's one convention
(:func:`bame.nm.group_view`: ``[Cout, G, M]``, layout ``row`` or ``channel``) and stored as

- ``values``  ``[Cout, G, N]`` in the weight's dtype: the kept weights of each group;
- ``indices`` ``[Cout, G, N]`` uint8: their positions ``0..M-1`` inside the group, strictly ascending.

A mask may keep *fewer* than N weights in a group ("at most N"). Such a group is padded to N slots
with the smallest positions the mask does not keep, each with value 0; the slot list stays sorted
and duplicate-free, so decompression is one ``scatter`` and ``decompress(compress(W, m)) == W * m``
exactly (pruned positions come back as +0). Padding slots cannot be told apart from kept weights
whose value is exactly 0; both decompress to 0, which is all the forward pass sees.

Size: ``Cout * G * N * (itemsize + 1)`` bytes against ``Cout * G * M * itemsize`` dense; e.g. 2:4 in
float16 is 0.75x dense, 1:16 in float32 is 5/64 of dense (one uint8 index per value; not bit-packed).

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

2:4 inference on CUDA
---------------------
:func:`to_semi_structured` swaps each eligible 2:4 layer for a module whose GEMM uses
``torch.sparse.to_sparse_semi_structured`` (linear: ``F.linear``; conv: ``F.unfold`` im2col, or a
strided view for 1x1 convs without padding, then the same GEMM). Layers that miss a constraint
(dtype, shape multiples, groups) are left as they are and reported.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint_file
from .contract import CHECKPOINT, COMPLETED
from .divergence import nonfinite_entries
from .layers import NMConv2d, NMLayer, NMLinear, nm_layers
from .nm import Layout, NMPattern, group_counts, group_view, is_nm, ungroup
from .runfolder import RunFolder, RunFolderError

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
_MAX_M = 256  # in-group positions are stored as uint8
EXIT_USAGE = 2  # bame.cli's status for a user error


# --------------------------------------------------------------------------------------------------
# The compressed format
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NMCompressed:
    """One N:M weight in compressed form (see the module docstring for the exact format)."""

    values: torch.Tensor  # [Cout, G, N], the weight's dtype
    indices: torch.Tensor  # [Cout, G, N] uint8, ascending positions 0..M-1 within each group
    shape: tuple[int, ...]  # the dense weight's shape
    pattern: NMPattern
    layout: Layout

    @property
    def nbytes(self) -> int:
        return compressed_nbytes(self)

    @property
    def dense_nbytes(self) -> int:
        return dense_nbytes(self)

    @property
    def ratio(self) -> float:
        return compression_ratio(self)

    def to_dict(self) -> dict:
        """Plain entry for the export file (only tensors, lists and strings)."""
        return dict(values=self.values, indices=self.indices, shape=list(self.shape),
                    pattern=str(self.pattern), layout=self.layout.value)

    @classmethod
    def from_dict(cls, entry: Mapping, name: str = "<layer>") -> NMCompressed:
        """Inverse of :meth:`to_dict`; checks that the parts fit together."""
        try:
            c = cls(entry["values"], entry["indices"], tuple(int(d) for d in entry["shape"]),
                    NMPattern.parse(entry["pattern"]), Layout.parse(entry["layout"]))
        except KeyError as err:
            raise ValueError(f"export entry for layer {name!r} lacks key {err.args[0]!r}") from None
        _check_compressed(c, name)
        return c


def _check_compressed(c: NMCompressed, name: str) -> None:
    cout = c.shape[0]
    k = math.prod(c.shape[1:])
    want = (cout, k // c.pattern.m, c.pattern.n)
    if tuple(c.values.shape) != want or tuple(c.indices.shape) != want or c.indices.dtype != torch.uint8:
        raise ValueError(
            f"export entry for layer {name!r} (weight {c.shape}, pattern {c.pattern}): expected values and "
            f"uint8 indices of shape {want}, got {tuple(c.values.shape)} and {tuple(c.indices.shape)} "
            f"{c.indices.dtype}")


def compress(weight: torch.Tensor, mask: torch.Tensor, pattern: NMPattern | str,
             layout: Layout | str = Layout.ROW) -> NMCompressed:
    """Compress ``weight * mask`` into N:M values + uint8 in-group indices.

    ``mask`` (bool or 0/1, the weight's shape) must keep at most N weights in every group of M;
    otherwise a ``ValueError`` names the shape, the pattern and how many groups break it.
    """
    pattern = NMPattern.parse(pattern)
    layout = Layout.parse(layout)
    n, m = pattern.n, pattern.m
    shape = tuple(weight.shape)
    if tuple(mask.shape) != shape:
        raise ValueError(f"cannot compress weight of shape {shape} with pattern {pattern}: "
                         f"mask shape {tuple(mask.shape)} differs")
    if m > _MAX_M:
        raise ValueError(f"cannot compress weight of shape {shape} with pattern {pattern}: "
                         f"M={m} > {_MAX_M} does not fit uint8 indices")
    keep = mask.detach() != 0
    try:
        counts = group_counts(keep, m, layout)  # [Cout, G]; raises if K is not a multiple of M
    except ValueError as err:
        raise ValueError(f"cannot compress with pattern {pattern}: {err}") from None
    bad = counts > n
    if bool(bad.any()):
        raise ValueError(
            f"mask of weight of shape {shape} is not {pattern} in layout {layout.value}: "
            f"{int(bad.sum())} of {counts.numel()} groups keep more than {n} "
            f"(up to {int(counts.max())} of {m})")
    gk = group_view(keep, m, layout)  # [Cout, G, M] bool
    gw = group_view(weight.detach(), m, layout)  # [Cout, G, M]
    # Kept positions sort first (key = position), unused after (key = M + position); the first N
    # are the kept ones plus, for groups keeping fewer than N, the smallest unused positions.
    pos = torch.arange(m, device=weight.device)
    key = (~gk).to(torch.int64) * m + pos
    slots = torch.sort(torch.sort(key, dim=-1).indices[..., :n], dim=-1).values  # [Cout, G, N] ascending
    values = torch.where(gk.gather(-1, slots), gw.gather(-1, slots), torch.zeros((), dtype=weight.dtype,
                                                                                 device=weight.device))
    return NMCompressed(values.contiguous(), slots.to(torch.uint8).contiguous(), shape, pattern, layout)


def decompress(c: NMCompressed) -> torch.Tensor:
    """The dense masked weight ``W * mask`` of ``c.shape`` (pruned positions are +0)."""
    cout = c.shape[0]
    groups = torch.zeros(cout, c.values.shape[1], c.pattern.m, dtype=c.values.dtype, device=c.values.device)
    groups.scatter_(-1, c.indices.long(), c.values)  # slots are distinct, so this is exact
    return ungroup(groups, c.shape, c.layout)


def dense_nbytes(c: NMCompressed) -> int:
    """Bytes of the dense weight ``c`` stands for."""
    return math.prod(c.shape) * c.values.element_size()


def compressed_nbytes(c: NMCompressed) -> int:
    """Bytes of values plus indices (one uint8 per kept value)."""
    return c.values.numel() * c.values.element_size() + c.indices.numel() * c.indices.element_size()


def compression_ratio(c: NMCompressed) -> float:
    """Dense bytes / compressed bytes (> 1 means smaller); e.g. 1.6 for 2:4 float32."""
    return dense_nbytes(c) / compressed_nbytes(c)


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


def export_state_dict(state: Mapping[str, torch.Tensor], pattern: NMPattern | str,
                      layout: Layout | str = Layout.ROW) -> dict:
    """Export a state dict holding N:M layers (found by their ``<name>.mask`` entries), all of ``pattern``."""
    pattern, layout = NMPattern.parse(pattern), Layout.parse(layout)
    return _build_export(state, {p: (pattern, layout) for p in _nm_prefixes(state)})


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
    exported = {**export_state_dict(state, pattern, layout), "source": source}
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
        print(f"bame: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if summary.warning:
        print(f"bame: warning: {summary.warning}", file=sys.stderr)
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


# --------------------------------------------------------------------------------------------------
# 2:4 semi-structured inference on CUDA
# --------------------------------------------------------------------------------------------------

_SEMI_DTYPES = (torch.float16, torch.bfloat16)
# Minimum (rows, cols) of the sparse [Cout, K] operand, each a multiple of it, as torch 2.1-2.14 state it
# per backend for float16 / bfloat16; the backend class's own table is read first when it has one.
_SEMI_MIN_SHAPE = {"cutlass": (32, 64), "cusparselt": (16, 16)}


def _semi_backend(backend: str) -> str:
    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"unknown semi-structured backend {backend!r}: use 'auto', 'cutlass' or 'cusparselt'")
    if backend != "auto":
        return backend
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def _semi_class(backend: str) -> type:
    import torch.sparse as ts  # public classes since torch 2.1

    return ts.SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else ts.SparseSemiStructuredTensorCUSPARSELT


def _semi_min_shape(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    try:
        cfg = _semi_class(backend)._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(cfg.sparse_min_rows), int(cfg.sparse_min_cols)
    except (AttributeError, KeyError, ImportError):
        return _SEMI_MIN_SHAPE[backend]


def gemm_weight(layer: NMLayer) -> torch.Tensor:
    """The masked weight as the GEMM operand ``[Cout, K]``, K in the layer's group order.

    Layout ``row``: ``weight.reshape(Cout, -1)`` (K = Cin*kh*kw, the order of ``F.unfold``). Layout
    ``channel`` (conv): K = kh*kw*Cin with Cin fastest, so each group of 4 is contiguous along K.
    """
    w = torch.where(layer.mask, layer.weight.detach(), torch.zeros((), dtype=layer.weight.dtype,
                                                                   device=layer.weight.device))
    if layer.layout is Layout.CHANNEL and w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(w.shape[0], -1).contiguous()


def semi_structured_skip_reason(layer: nn.Module, backend: str = "cutlass") -> str | None:
    """Why ``layer`` cannot use 2:4 semi-structured kernels (None when it can); pure, no CUDA needed."""
    if not isinstance(layer, (NMLinear, NMConv2d)):
        return "not an N:M layer"
    if layer.pattern.m != 4 or layer.pattern.n > 2:
        return f"pattern {layer.pattern} is not 2:4 (the kernels need at most 2 of every 4)"
    if isinstance(layer, NMConv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if not is_nm(layer.mask, 2, 4, layer.layout):
        return "mask keeps more than 2 of 4 in some group (a kernel would silently drop weights)"
    if layer.weight.dtype not in _SEMI_DTYPES:
        return f"dtype {layer.weight.dtype} (needs float16 or bfloat16: convert the model first)"
    if layer.weight.device.type != "cuda":
        return f"weight on {layer.weight.device} (needs CUDA)"
    rows, cols = layer.weight.shape[0], layer.weight[0].numel()
    min_rows, min_cols = _semi_min_shape(backend, layer.weight.dtype)
    if rows % min_rows or cols % min_cols:
        return (f"GEMM weight [{rows}, {cols}] is not a multiple of [{min_rows}, {min_cols}] "
                f"({backend} {str(layer.weight.dtype).replace('torch.', '')})")
    return None


class SemiStructuredLinear(nn.Module):
    """``F.linear`` with a (semi-structured) ``[Cout, K]`` weight; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SemiStructuredConv2d(nn.Module):
    """A conv as a GEMM with a (semi-structured) ``[Cout, K]`` weight; inference only, groups=1.

    ``x[B, Cin, H, W]`` -> columns ``[B*L, K]`` (``F.unfold``, L = Ho*Wo; a strided view for 1x1 convs
    without padding) -> ``F.linear`` -> ``[B, Cout, Ho, Wo]``. With layout ``channel`` the columns are
    reordered to K = (kh, kw, Cin), the weight's order (see :func:`gemm_weight`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], layout: Layout | str = Layout.ROW) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_channels = in_channels
        self.out_channels = weight.shape[0]
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.layout = Layout.parse(layout)

    @classmethod
    def from_nm(cls, conv: NMConv2d, weight: torch.Tensor) -> SemiStructuredConv2d:
        return cls(weight, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.layout)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                     zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, cin = x.shape[0], self.in_channels
        ho, wo = self._out_hw(x.shape[2], x.shape[3])
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            xs = x[:, :, :: self.stride[0], :: self.stride[1]]  # [B, Cin, Ho, Wo]
            cols = xs.permute(0, 2, 3, 1).reshape(-1, cin)  # [B*L, Cin]
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, Cin*kk, L]
            k = cols.shape[1]
            if self.layout is Layout.CHANNEL:
                cols = cols.view(b, cin, k // cin, -1).transpose(1, 2).reshape(b, k, -1)  # K = (kk, Cin)
            cols = cols.transpose(1, 2).reshape(-1, k)  # [B*L, K]
        out = F.linear(cols, self.weight, self.bias)  # [B*L, Cout]
        return out.view(b, ho, wo, self.out_channels).permute(0, 3, 1, 2).contiguous()


@dataclass
class SemiStructuredReport:
    """Which N:M layers ``to_semi_structured`` converted and why it left the others."""

    backend: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason

    def __str__(self) -> str:
        lines = [f"semi-structured 2:4 ({self.backend}): {len(self.converted)} converted, "
                 f"{len(self.skipped)} left as they are"]
        lines += [f"  2:4    {name}" for name in self.converted]
        lines += [f"  as is  {name:<40} {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_semi_structured(model: nn.Module, backend: str = "auto") -> SemiStructuredReport:
    """Swap (in place) each eligible 2:4 N:M layer of a CUDA float16/bfloat16 ``model`` for inference.

    ``backend``: 'auto' (cuSPARSELt when available, else CUTLASS), 'cutlass' or 'cusparselt'. Layers
    that miss a constraint (:func:`semi_structured_skip_reason`) or whose conversion fails stay as
    they are and are listed in the report. Raises ``RuntimeError`` without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs a CUDA device (2:4 semi-structured kernels)")
    backend = _semi_backend(backend)
    convert = _semi_class(backend).from_dense
    report = SemiStructuredReport(backend)
    for name, layer in list(nm_layers(model)):
        reason = semi_structured_skip_reason(layer, backend)
        if reason is None and not name:
            reason = "the model itself is the N:M layer: wrap it in a container"
        if reason is not None:
            report.skipped[name] = reason
            continue
        try:
            weight = convert(gemm_weight(layer))
        except (RuntimeError, ValueError) as err:
            report.skipped[name] = f"conversion failed: {err}"
            continue
        if isinstance(layer, NMLinear):
            new: nn.Module = SemiStructuredLinear(weight, layer.bias)
        else:
            new = SemiStructuredConv2d.from_nm(layer, weight)
        _set_submodule(model, name, new)
        report.converted.append(name)
    return report
