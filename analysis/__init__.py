"""Analysis of run folders: runs -> pandas DataFrames -> tables, figures and reports.

Pure and one-way: it reads what ``bame/runs.py`` wrote (docs/contracts.md) and never imports the
training code. FLOPs are counted as multiply-accumulates (MACs); FLOPs = 2 x MACs.
"""

from .ablations import (ablation_deltas, ablation_figure, ablation_keys, ablation_runs, ablation_table,
                        ablations_figure, format_ablation_table, study_ablation_runs)
from .costs import closed_form_checks, executed_over_ideal, phase_table, step_cost_bars, step_cost_lines, step_costs_table
from .figures import accuracy_vs_flops, frozen_fraction, layer_flips, learning_curves, mask_flips, training_loss
from .forest import forest_plot
from .groups import fill_defaults, group_labels, matching, run_groups, run_points
from .heatmaps import oscillation_heatmaps
from .labels import reading_label, reading_labels
from .layout import text_problems
from .masks import MASK_STAT_DIGITS, block_summary, mask_image, mask_stats
from .pareto import group_means, pareto_front, pareto_scatter
from .phases import PHASE_LABELS, phase_breakdown, phase_totals
from .published import load_published, published_comparison
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
from .readings import format_readings_table, readings_table
from .report import write_report
from .style import has_data, save
from .tables import comparable_keys, format_paper_table, mean_std_table, paper_table, pm, to_markdown

__all__ = [
    # readers
    "FLOPS_CONVENTION", "NotARunFolderError", "find_run_folders", "run_path", "load_runs",
    "load_manifest", "load_config", "load_summary", "load_metrics", "load_flops", "load_masks",
    "load_adaptation", "load_sparsify", "load_blocks", "load_block_arrays", "load_published",
    # groups and tables
    "run_groups", "run_points", "fill_defaults", "group_labels", "matching", "reading_label", "reading_labels",
    "comparable_keys", "paper_table", "format_paper_table",
    "readings_table", "format_readings_table", "to_markdown", "pm", "mean_std_table", "published_comparison",
    # the notebooks' readings: masks, costs, ablations
    "mask_stats", "MASK_STAT_DIGITS", "block_summary", "phase_table", "executed_over_ideal", "step_costs_table",
    "step_cost_lines", "closed_form_checks", "ablation_keys", "ablation_runs", "study_ablation_runs", "ablation_table",
    "format_ablation_table", "ablation_deltas",
    # figures
    "pareto_scatter", "pareto_front", "group_means", "forest_plot", "training_loss", "layer_flips",
    "accuracy_vs_flops", "oscillation_heatmaps", "frozen_fraction", "mask_flips", "phase_breakdown",
    "learning_curves", "mask_image", "step_cost_bars", "ablation_figure", "ablations_figure",
    "phase_totals", "PHASE_LABELS", "has_data", "save", "text_problems",
    # report
    "write_report",
]
