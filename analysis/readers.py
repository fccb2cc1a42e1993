"""Read run folders (docs/contracts.md, "Run folder") into pandas DataFrames.

Pure: files in, DataFrames out, through the one reader of run folders (``bame.runfolder``) and the names of
``bame.contract``; nothing here imports the training code or torch, so results can be read on a machine
without torch. A *run folder* is a directory holding ``manifest.json`` (written first by ``bame/runs.py``);
``DONE`` marks a finished run. Every loader takes a run as a path or as a row of :func:`load_runs`
(anything with a ``path`` entry).

Units: accuracies are written as fractions in [0, 1] (``acc`` columns, as read); ``top1`` columns
are in percent. FLOPs are counted as multiply-accumulates (MACs) and FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from bame.contract import (ADAPTATION_TABLE, BLOCK_FIELDS, COMPLETED, FLOPS_CONVENTION as _CONVENTION, FLOPS_TABLE,
                           MANIFEST, MASKS_TABLE, METRICS_TABLE, RUNNING, SPARSIFY_TABLE)
from bame.runfolder import RunFolder, RunNotFoundError, find_run_folders

__all__ = [
    "FLOPS_CONVENTION",
    "NotARunFolderError",
    "RunLike",
    "accuracy_percent",
    "find_run_folders",
    "load_adaptation",
    "load_block_arrays",
    "load_blocks",
    "load_config",
    "load_flops",
    "load_manifest",
    "load_masks",
    "load_metrics",
    "load_runs",
    "load_sparsify",
    "load_summary",
    "run_path",
]

FLOPS_CONVENTION = f"FLOPs counted as {_CONVENTION}."  # the contract's convention, as a sentence

RunLike = Union[str, Path, Mapping[str, Any], pd.Series]

BLOCKS_COLUMNS = ["step", "layer", "block", *BLOCK_FIELDS]
NotARunFolderError = RunNotFoundError  # a path given as a run folder is missing, or holds no manifest.json


# --------------------------------------------------------------------------------------------------
# locating runs


def run_path(run: RunLike) -> Path:
    """The folder of ``run`` (a path, or a row of :func:`load_runs`); raises NotARunFolderError."""
    if isinstance(run, (pd.Series, Mapping)):
        if "path" not in run:
            raise NotARunFolderError("a run given as a row needs a 'path' entry (use a row of load_runs)")
        run = run["path"]
    if not isinstance(run, (str, Path)):
        raise TypeError(f"a run is a path or a row of load_runs, got {type(run).__name__}")
    path = Path(run)
    if not path.exists():
        raise NotARunFolderError(f"{str(path)!r} is not a run folder: it does not exist")
    if not path.is_dir():
        raise NotARunFolderError(f"{str(path)!r} is not a run folder: it is a file, not a directory")
    if not (path / MANIFEST).is_file():
        inside = find_run_folders(path)
        hint = ""
        if inside:
            names = ", ".join(str(p.relative_to(path)) for p in inside[:3])
            more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
            hint = f"; it holds {len(inside)} run folder(s) ({names}{more}): use load_runs on it"
        raise NotARunFolderError(f"{str(path)!r} is not a run folder: it has no manifest.json{hint}")
    return path


def _folder(run: RunLike) -> RunFolder:
    return RunFolder(run_path(run))


# --------------------------------------------------------------------------------------------------
# small file readers


def load_manifest(run: RunLike) -> dict:
    """``manifest.json`` as a dict."""
    return _folder(run).manifest


def load_summary(run: RunLike) -> dict:
    """``summary.json`` as a dict (empty when the run has not written one yet)."""
    return _folder(run).summary or {}


def load_config(run: RunLike) -> dict:
    """The resolved ``config.yaml`` as a nested dict (empty when absent)."""
    folder = _folder(run)
    return folder.config_dict if folder.has_config else {}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists become tuples (hashable, groupable), a mapping inside a list
    its text (``method.layer_patterns``: ``('{match: conv2, pattern: 2:4}',)``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list):
            out[name] = tuple(_item_text(v) if isinstance(v, Mapping) else v for v in value)
        else:
            out[name] = value
    return out


def _item_text(item: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in item.items()) + "}"


# --------------------------------------------------------------------------------------------------
# per-run tables


def load_metrics(run: RunLike) -> pd.DataFrame:
    """``metrics.csv``: a row per logged step and per evaluation (column ``split``: train/test...).

    Empty (with the contract's columns) when the run has not logged yet.
    """
    return _folder(run).table(METRICS_TABLE)


def load_flops(run: RunLike) -> pd.DataFrame:
    """``flops.csv``: MACs per epoch x layer x phase (ideal and executed); FLOPs = 2 x MACs."""
    return _folder(run).table(FLOPS_TABLE)


def load_masks(run: RunLike) -> pd.DataFrame:
    """``masks.csv``: mask flips (SAD) per logged step and layer; empty for dense runs."""
    return _folder(run).table(MASKS_TABLE)


def load_adaptation(run: RunLike) -> pd.DataFrame:
    """``adaptation.csv``: what each BAME adaptation step did per layer; empty for other methods."""
    return _folder(run).table(ADAPTATION_TABLE)


def load_sparsify(run: RunLike) -> pd.DataFrame:
    """``sparsify.csv``: which layers became N:M and why the others stayed dense."""
    return _folder(run).table(SPARSIFY_TABLE)


def _split_key(key: str) -> tuple[str, str]:
    # Layer names hold dots themselves ('layer1.0.conv1'): the field is after the last one.
    layer, _, fld = key.rpartition(".")
    return layer, fld


def load_block_arrays(run: RunLike, layers: Iterable[str] | None = None,
                      fields: Iterable[str] = BLOCK_FIELDS) -> dict[str, dict[str, np.ndarray]]:
    """Per-block state from ``blocks/step_*.npz`` as arrays: ``{layer: {'step': [S], field: [S, B]}}``.

    ``B`` is the layer's number of blocks (each snapshot's array flattened in C order). Snapshots
    that lack a layer or field are skipped for that layer.
    """
    wanted = set(layers) if layers is not None else None
    fields = tuple(fields)
    per_layer: dict[str, dict[str, list]] = {}
    for step, path in _folder(run).block_snapshots():
        with np.load(path) as npz:
            keys = list(npz.keys())
            by_layer: dict[str, dict[str, np.ndarray]] = {}
            for key in keys:
                layer, fld = _split_key(key)
                if fld in fields and (wanted is None or layer in wanted):
                    by_layer.setdefault(layer, {})[fld] = np.asarray(npz[key]).reshape(-1)
        for layer, arrays in by_layer.items():
            slot = per_layer.setdefault(layer, {"step": [], **{f: [] for f in fields}})
            if any(f not in arrays for f in fields):
                continue
            slot["step"].append(step)
            for f in fields:
                slot[f].append(arrays[f])
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer, slot in per_layer.items():
        if not slot["step"]:
            continue
        out[layer] = {"step": np.asarray(slot["step"], dtype=np.int64)}
        for f in fields:
            out[layer][f] = np.stack(slot[f])
    return out


def load_blocks(run: RunLike, layers: Iterable[str] | None = None,
                steps: Iterable[int] | None = None) -> pd.DataFrame:
    """Per-block BAME state in long format: step, layer, block, frequency, frozen, last_score, changes.

    One row per (snapshot step, layer, block) from ``blocks/step_*.npz``; empty for runs without
    snapshots. ``layers`` / ``steps`` restrict what is read (snapshots of big models are large).
    """
    arrays = load_block_arrays(run, layers=layers)
    keep = {int(s) for s in steps} if steps is not None else None
    frames = []
    for layer, a in arrays.items():
        n_steps, n_blocks = a["frequency"].shape
        sel = np.ones(n_steps, dtype=bool) if keep is None else np.isin(a["step"], list(keep))
        if not sel.any():
            continue
        k = int(sel.sum())
        frames.append(pd.DataFrame({
            "step": np.repeat(a["step"][sel], n_blocks),
            "layer": layer,
            "block": np.tile(np.arange(n_blocks), k),
            "frequency": a["frequency"][sel].reshape(-1).astype(float),
            "frozen": a["frozen"][sel].reshape(-1).astype(bool),
            "last_score": a["last_score"][sel].reshape(-1).astype(float),
            "changes": a["changes"][sel].reshape(-1).astype(np.int64),
        }))
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype=np.int64), "layer": pd.Series(dtype=object),
                             "block": pd.Series(dtype=np.int64), "frequency": pd.Series(dtype=float),
                             "frozen": pd.Series(dtype=bool), "last_score": pd.Series(dtype=float),
                             "changes": pd.Series(dtype=np.int64)})
    return pd.concat(frames, ignore_index=True).sort_values(["step", "layer", "block"],
                                                            ignore_index=True)


# --------------------------------------------------------------------------------------------------
# the table of runs


def accuracy_percent(value: Any) -> float:
    """An accuracy as bame writes it (a fraction in [0, 1]) in percent; NaN when missing."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return 100.0 * v


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _status(folder: RunFolder, manifest: dict) -> str:
    status = manifest.get("status")
    if folder.done and status in (None, RUNNING):
        return COMPLETED
    if status is None:
        return "unknown"
    return str(status)


def _last_eval(metrics: pd.DataFrame) -> dict[str, float]:
    """Final test accuracy / loss and cumulative MACs from metrics.csv (fallback for unfinished runs)."""
    out: dict[str, float] = {}
    if metrics.empty:
        return out
    if "cum_ideal_macs" in metrics:
        ideal = metrics["cum_ideal_macs"].dropna()
        if len(ideal):
            out["ideal_macs"] = float(ideal.iloc[-1])
    if "cum_executed_macs" in metrics:
        ex = metrics["cum_executed_macs"].dropna()
        if len(ex):
            out["executed_macs"] = float(ex.iloc[-1])
    if "wall_time_s" in metrics:
        wt = metrics["wall_time_s"].dropna()
        if len(wt):
            out["wall_time_s"] = float(wt.iloc[-1])
    if "split" in metrics:
        test = metrics[metrics["split"].astype(str).isin(["test", "val", "eval"])]
        if len(test):
            last = test.iloc[-1]
            out["acc"] = _num(last.get("acc"))
            out["loss"] = _num(last.get("loss"))
    return out


def _summary_fields(summary: dict) -> dict[str, float]:
    """The final numbers of summary.json under the names of load_runs."""
    flat = flatten(summary)
    pick = {  # summary.json as bame/train.py writes it
        "acc": ("final.test_acc",),
        "loss": ("final.test_loss",),
        "best_acc": ("best_test_acc",),
        "ideal_macs": ("flops.ideal_macs",),
        "executed_macs": ("flops.executed_macs",),
        "dense_macs": ("flops.dense_macs",),
        "ideal_x_dense": ("flops.ideal_x_dense",),
        "wall_time_s": ("wall_time_s",),
        "steps": ("steps",),
    }
    out = {}
    for name, keys in pick.items():
        v = _first(flat, *keys)
        if v is not None:
            out[name] = _num(v)
    if flat.get("flops.enabled") is False:
        # the ledger was off: its zeros are no count
        for name in ("ideal_macs", "executed_macs", "dense_macs", "ideal_x_dense"):
            out[name] = math.nan
    return out


# manifest entries copied into load_runs (as ``manifest.<key>``, nested ones flattened)
_MANIFEST_KEYS = ("id", "created", "started", "finished", "git", "device", "host", "config_name", "error", "versions")


def _run_row(path: Path, root: Path) -> dict[str, Any]:
    folder = RunFolder(path)
    manifest = folder.manifest
    summary = folder.summary or {}
    config = folder.config_dict if folder.has_config else {}
    row: dict[str, Any] = {
        "run_id": path.name,  # the writer names the folder by its id; manifest.id may be stale in a copy
        "path": str(path),
        "relpath": str(path.relative_to(root)) if path != root else ".",
        "status": _status(folder, manifest),
        "done": folder.done,
        "has_summary": bool(summary),
    }
    for key, value in flatten(manifest).items():
        if key.split(".")[0] in _MANIFEST_KEYS and not isinstance(value, tuple):
            row[f"manifest.{key}"] = value
    cfg = flatten(config)
    # YAML 1.1 reads an unquoted 1:16 as the base-60 integer 76; a resolved config should quote it.
    for key, value in cfg.items():
        if key.endswith("pattern") and value is not None and not isinstance(value, str):
            cfg[key] = str(value)
    row.update(cfg)
    # summary.json wins; the last rows of metrics.csv fill what it lacks (and unfinished runs)
    merged = {**_last_eval(folder.table(METRICS_TABLE)), **_summary_fields(summary)}
    if cfg.get("instrument.flops") is False:
        # the ledger was off: the zeros it left are no count
        for name in ("ideal_macs", "executed_macs", "dense_macs", "ideal_x_dense"):
            merged[name] = math.nan
    for name in ("acc", "loss", "best_acc", "ideal_macs", "executed_macs", "dense_macs", "ideal_x_dense",
                 "wall_time_s", "steps"):
        row[name] = merged.get(name, math.nan)
    row["top1"] = accuracy_percent(row["acc"])
    row["ideal_flops"] = 2.0 * row["ideal_macs"]
    row["executed_flops"] = 2.0 * row["executed_macs"]
    if math.isnan(row["ideal_x_dense"]) and not math.isnan(row["dense_macs"]) and row["dense_macs"] > 0:
        row["ideal_x_dense"] = row["ideal_macs"] / row["dense_macs"]
    for key, value in flatten(summary).items():
        row.setdefault(f"summary.{key}", value)
    return row


# Columns always present (in this order) in load_runs, whatever the folders hold.
RUN_COLUMNS = ["run_id", "path", "relpath", "status", "done", "has_summary", "method.name",
               "method.pattern", "train.seed", "data.name", "model.name", "top1", "acc", "loss",
               "best_acc", "ideal_macs", "executed_macs", "ideal_flops", "executed_flops", "dense_macs",
               "ideal_x_dense", "wall_time_s", "steps"]


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder found under ``root`` (recursively), incomplete runs included.

    Columns: ``run_id`` (the folder's name; its path under ``root`` where two folders share a
    name), ``path``, ``relpath``, ``status`` (completed | running | failed | interrupted | diverged | unknown,
    from manifest.json and DONE), ``done``, ``has_summary``; every config key flattened with dots
    (``method.name``, ``method.pattern``, ``train.seed``, ``data.name``, ``model.name``,
    ``method.bame.rho``...); final numbers from summary.json, or from the last rows of metrics.csv
    for a run without one: ``acc`` / ``loss`` (final test; ``acc`` a fraction, as written),
    ``top1`` (``acc`` in percent), ``best_acc``, ``ideal_macs`` / ``executed_macs`` (training
    totals, every phase), ``ideal_flops`` / ``executed_flops`` (= 2 x MACs), ``dense_macs`` and
    ``ideal_x_dense`` (the ledger's dense-equivalent count and the ratio to it), ``wall_time_s``,
    ``steps``; every summary key as ``summary.<key>`` and some manifest keys as ``manifest.<key>``.
    ``df.attrs['flops_convention']`` states the counting convention.
    """
    root = Path(root)
    rows = [_run_row(folder, root) for folder in find_run_folders(root)]
    df = pd.DataFrame(rows)
    if len(df) and df["run_id"].duplicated(keep=False).any():
        # the same folder name in two sub-folders: tell them apart by their path under root
        dup = df["run_id"].duplicated(keep=False)
        df.loc[dup, "run_id"] = df.loc[dup, "relpath"]
    for col in RUN_COLUMNS:
        if col not in df:
            df[col] = pd.Series([math.nan] * len(df), dtype=float if col not in ("run_id", "path") else object)
    rest = [c for c in df.columns if c not in RUN_COLUMNS]
    df = df[RUN_COLUMNS + sorted(rest)]
    if len(df):
        df = df.sort_values(["method.name", "method.pattern", "train.seed", "run_id"],
                            na_position="last", ignore_index=True, key=_sort_key)
    df.attrs["flops_convention"] = FLOPS_CONVENTION
    df.attrs["root"] = str(root)
    return df


def _sort_key(col: pd.Series) -> pd.Series:
    # mixed types (NaN next to strings) cannot be compared: sort on the text
    return col.astype(str) if col.dtype == object else col
