"""Analysis of run folders: runs -> pandas DataFrames -> tables and matplotlib figures.

Pure and one-way: it reads what ``bame/runs.py`` wrote (docs/contracts.md) and never imports the
training code. FLOPs are counted as multiply-accumulates (MACs); FLOPs = 2 x MACs.
"""

from .figures import (
    accuracy_vs_flops,
    frozen_fraction,
    has_data,
    mask_flips,
    oscillation_heatmaps,
    phase_breakdown,
    phase_totals,
    run_groups,
    save,
)
from .published import load_published
from .readers import (
    FLOPS_CONVENTION,
    NotARunFolderError,
    find_run_folders,
    load_adaptation,
    load_block_arrays,
    load_blocks,
    load_config,
    load_flops,
    load_manifest,
    load_masks,
    load_metrics,
    load_runs,
    load_sparsify,
    load_summary,
    run_path,
)
from .report import write_report
from .tables import comparable_keys, format_paper_table, paper_table, to_markdown

__all__ = [
    # readers
    "FLOPS_CONVENTION", "NotARunFolderError", "find_run_folders", "run_path", "load_runs",
    "load_manifest", "load_config", "load_summary", "load_metrics", "load_flops", "load_masks",
    "load_adaptation", "load_sparsify", "load_blocks", "load_block_arrays", "load_published",
    # tables
    "paper_table", "format_paper_table", "to_markdown", "comparable_keys",
    # figures
    "accuracy_vs_flops", "oscillation_heatmaps", "frozen_fraction", "mask_flips", "phase_breakdown",
    "phase_totals", "run_groups", "has_data", "save",
    # report
    "write_report",
]
