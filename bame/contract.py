"""The run-folder contract: the names that the writers of a run folder and its readers share.

One spelling of each: the files of a run folder, the tables and their columns, the run's statuses, the
phases of the FLOPs ledger and its counting convention, and the run id. The writers (``bame.runs``, the
training loop, the recorders, the ledger) and the readers (``bame.runfolder``, ``analysis``, ``bame
export``, ``bame inspect``) import them from here. Plain Python, no torch: ``analysis`` reads run folders
on a machine without it. docs/contracts.md says what each file and column holds.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Mapping
from typing import Any, Optional

from .pattern import NMPattern

__all__ = [
    "MANIFEST", "CONFIG", "SUMMARY", "DONE", "LOCK", "CHECKPOINT", "BLOCKS_DIR", "TENSORBOARD_DIR", "block_name",
    "block_step",
    "METRICS_TABLE", "FLOPS_TABLE", "MASKS_TABLE", "ADAPTATION_TABLE", "SPARSIFY_TABLE", "TABLE_COLUMNS",
    "METRICS_COLUMNS", "FLOPS_COLUMNS", "MASKS_COLUMNS", "ADAPTATION_COLUMNS", "SPARSIFY_COLUMNS",
    "BLOCK_FIELDS", "table_file", "compressed_table_file",
    "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED", "DIVERGED", "STATUSES",
    "FLOPS_CONVENTION", "FLOPS_PER_MAC", "FORWARD", "INPUT_GRAD", "WEIGHT_GRAD", "ADAPTATION",
    "LAYER_PHASES", "PHASES", "ADAPTATION_LAYER",
    "PATTERNLESS_METHODS", "DENSE_PATTERN", "MIXED_PATTERN", "LAYER_RULE_KEYS", "MASK_STRUCTURES", "ROW_MASKS",
    "TRANSPOSABLE", "TRANSPOSABLE_TAG", "is_mixed", "pattern_label", "run_id",
]

# -- the files of a run folder (docs/run_folders.md) ------------------------------------------------
MANIFEST = "manifest.json"  # written first
CONFIG = "config.yaml"  # the resolved config
SUMMARY = "summary.json"
DONE = "DONE"  # written last, by a run that completed
LOCK = ".lock"  # held by the one process writing the folder (bame.runlock)
CHECKPOINT = "checkpoints/last.pt"
BLOCKS_DIR = "blocks"  # BAME's per-block snapshots, one file per recorded adaptation step
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files (train.tensorboard)
_BLOCK_FILE = re.compile(r"^step_(\d+)\.npz$")


def block_name(step: int) -> str:
    """The snapshot of adaptation step ``step`` (0-based): ``step_00000100``, the file ``blocks/step_00000100.npz``."""
    return f"step_{int(step):08d}"


def block_step(file_name: str) -> Optional[int]:
    """The step a snapshot file is of (``None`` for a file that is not one)."""
    match = _BLOCK_FILE.match(file_name)
    return int(match.group(1)) if match else None


# -- tables: <name>.csv, a row per record --------------------------------------------------------------
METRICS_TABLE, FLOPS_TABLE, MASKS_TABLE = "metrics", "flops", "masks"
ADAPTATION_TABLE, SPARSIFY_TABLE = "adaptation", "sparsify"
# metrics.csv: these first, then the recorders' scalars (sad_fraction, cum_mask_flips)
METRICS_COLUMNS = ("step", "epoch", "split", "lr", "loss", "acc", "wall_time_s", "step_ideal_macs",
                   "cum_ideal_macs", "cum_executed_macs")
FLOPS_COLUMNS = ("epoch", "step", "layer", "phase", "ideal_macs", "executed_macs", "nm_on_reduction")
MASKS_COLUMNS = ("step", "layer", "flips", "flip_fraction")
ADAPTATION_COLUMNS = ("step", "layer", "rho", "num_blocks", "candidate_blocks", "frozen_blocks",
                      "selected_blocks", "swaps", "oscillation_events", "score_mean", "score_max",
                      "freq_mean", "freq_p90", "frozen_fraction", "designated_blocks")
# sparsify.csv: 'pattern' the layer's own ("dense" for a dense layer), 'rule' the per-layer rule that decided
# it (e.g. "method.layer_patterns[1]"; empty where the global pattern and the layer policy did);
# forward_kernel / input_grad_kernel / weight_grad_kernel: what ran those phases of an N:M layer
# (method.forward_kernel, ...)
SPARSIFY_COLUMNS = ("name", "kind", "shape", "sparse", "reason", "pattern", "rule", "forward_kernel",
                    "input_grad_kernel", "weight_grad_kernel")
TABLE_COLUMNS = {METRICS_TABLE: METRICS_COLUMNS, FLOPS_TABLE: FLOPS_COLUMNS, MASKS_TABLE: MASKS_COLUMNS,
                 ADAPTATION_TABLE: ADAPTATION_COLUMNS, SPARSIFY_TABLE: SPARSIFY_COLUMNS}
# blocks/step_*.npz: arrays <layer>.<field> (and <layer>.designated under BAME's 'window' reading)
BLOCK_FIELDS = ("frequency", "frozen", "last_score", "changes")


def table_file(table: str) -> str:
    return f"{table}.csv"


def compressed_table_file(table: str) -> str:
    """A table stored gzip-compressed (a results bundle's, ``bame bundle``); readers take it for ``<table>.csv``."""
    return f"{table}.csv.gz"


# -- statuses (manifest.json "status", and each resume entry's) ---------------------------------------
RUNNING, COMPLETED, FAILED, INTERRUPTED, DIVERGED = "running", "completed", "failed", "interrupted", "diverged"
STATUSES = (RUNNING, COMPLETED, FAILED, INTERRUPTED, DIVERGED)

# -- the FLOPs ledger -----------------------------------------------------------------------------------
FLOPS_CONVENTION = "MACs (multiply-accumulates); FLOPs = 2 x MACs"  # every count; summary.json records it
FLOPS_PER_MAC = 2
FORWARD, INPUT_GRAD, WEIGHT_GRAD, ADAPTATION = "forward", "input_grad", "weight_grad", "adaptation"
LAYER_PHASES = (FORWARD, INPUT_GRAD, WEIGHT_GRAD)  # the phases of a conv/linear layer, in execution order
PHASES = LAYER_PHASES + (ADAPTATION,)  # ... and the element-wise work of mask adaptation
ADAPTATION_LAYER = "(adaptation)"  # flops.csv's 'layer' of the adaptation line

# -- run ids and patterns ---------------------------------------------------------------------------------
# Methods that train every layer dense: their config's method.pattern is unused, their run id has none,
# and readers show their pattern as DENSE_PATTERN.
PATTERNLESS_METHODS = ("dense",)
DENSE_PATTERN = "dense"
# A run whose config sets patterns per layer (method.layer_patterns, method.layer_pattern_file) is "mixed":
# its run id and readers show MIXED_PATTERN; sparsify.csv holds each layer's own pattern.
MIXED_PATTERN = "mixed"
LAYER_RULE_KEYS = ("layer_patterns", "layer_pattern_file")  # keys of the config's method section
# method.mask_structure: N:M along K only ('row'), or along K and Cout in every MxM tile ('transposable');
# a transposable run's id carries TRANSPOSABLE_TAG after its pattern (2of4T)
ROW_MASKS, TRANSPOSABLE = "row", "transposable"
MASK_STRUCTURES = (ROW_MASKS, TRANSPOSABLE)
TRANSPOSABLE_TAG = "T"


def _given(value: Any) -> bool:
    """A config value that is set: not None, NaN (a column a run lacks), empty text or an empty list."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, (str, list, tuple)) and len(value) == 0)


def is_mixed(method: Mapping[str, Any]) -> bool:
    """Whether a config's ``method`` section (a mapping, as ``config.yaml`` writes it) sets patterns per layer."""
    return any(_given(method.get(key)) for key in LAYER_RULE_KEYS)


def pattern_label(method: str, pattern: object, mixed: bool = False) -> str:
    """The pattern a reader shows for a run: ``"1:16"``, ``"mixed"`` for per-layer patterns, or ``"dense"`` for
    a method that has none."""
    if str(method) in PATTERNLESS_METHODS:
        return DENSE_PATTERN
    return MIXED_PATTERN if mixed else str(pattern)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("_") or "run"


def run_id(when: _dt.datetime, config_name: str, method: str, pattern: NMPattern | str, seed: int, *,
           mixed: bool = False, transposable: bool = False) -> str:
    """``<YYYYmmdd-HHMMSS>-<config name>-<method>-<NofM>-s<seed>``, e.g. ``20250101-120000-quick-bame-2of4-s0``;
    a dense run has no pattern: ``20250101-120000-quick-dense-s0``; per-layer patterns write ``mixed`` in place
    of ``<NofM>``, and transposable masks add ``T`` to it (``bame-2of4T``, ``bame-mixedT``)."""
    parts = [when.strftime("%Y%m%d-%H%M%S"), _slug(config_name), _slug(method)]
    if method not in PATTERNLESS_METHODS:
        slug = MIXED_PATTERN if mixed else NMPattern.parse(pattern).slug
        parts.append(_slug(slug + (TRANSPOSABLE_TAG if transposable else "")))
    return "-".join([*parts, f"s{seed}"])
