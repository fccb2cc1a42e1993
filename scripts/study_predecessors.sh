#!/usr/bin/env bash
# The methods table of docs/results.md ("Predecessors"): Bi-Mask (bimask) and LBC (lbc) beside static, srste
# and bame on Fashion-MNIST with LeNet-5-wide at 1:16 and 2:4, seeds 0, 1, 2, 3 epochs
# (configs/study/fmnist_lenet_wide.yaml). Their defaults: bimask searches its permutation every 100 steps
# over 100 candidates; lbc cuts its combinations over the first half of training. Completed runs are
# skipped, so the script can be stopped and started again. About 1-3 minutes a run on one CPU thread.
# Usage:
#   bash scripts/study_predecessors.sh [OUT (default runs/methods13)] [extra sweep options]
#   BASELINE_PATTERNS=2:4 bash scripts/study_predecessors.sh ...  (static/srste/bame at 2:4 only, when
#                                                                  the 1:16 ones exist in another folder)
#   SEEDS=0 bash scripts/study_predecessors.sh ...  (one seed of every row: run seed by seed, a stopped
#                                                   study still has every row)
# then the table: python scripts/methods_table.py OUT [more folders]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/methods13}
shift || true
BAME=${BAME:-.venv/bin/bame}
CONFIG=configs/study/fmnist_lenet_wide.yaml
JOBS=${JOBS:-1}
PATTERNS=${PATTERNS:-1:16,2:4}
BASELINE_PATTERNS=${BASELINE_PATTERNS:-$PATTERNS}
$BAME data get fashion-mnist --root data
SEEDS=${SEEDS:-0,1,2}
sweep() { $BAME sweep --config "$CONFIG" --out "$OUT" --seeds "$SEEDS" --jobs "$JOBS" --no-progress "$@"; }
sweep --methods bimask,lbc --patterns "$PATTERNS" "$@"
sweep --methods static,srste,bame --patterns "$BASELINE_PATTERNS" "$@"
