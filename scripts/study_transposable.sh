#!/usr/bin/env bash
# What transposable masks cost: static and bame with method.mask_structure=transposable (every MxM tile N:M in
# its rows and its columns, so that the input gradient's (W*m)^T is N:M too) on Fashion-MNIST with
# LeNet-5-wide, 3 epochs, 3 seeds, at 1:16 and 2:4, and the row-mask static and bame at 2:4 beside them (the
# row-mask runs at 1:16 are scripts/study_fmnist.sh's). Under transposable masks BAME's blocks are whole
# tiles: block_rows = M (4 at 2:4, 16 at 1:16), so a block is one tile and its change one rectangle exchange.
# 18 runs of 2-3 minutes each on one thread. Completed runs are skipped, so the script can be stopped and
# started again. Usage:
#   bash scripts/study_transposable.sh [OUT (default runs/transposable)] [extra sweep options]
#   (JOBS=1 for one run at a time; BAME="python -m bame" to run from a checkout without .venv/bin/bame)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/transposable}
shift || true
BAME=${BAME:-.venv/bin/bame}
CONFIG=configs/study/fmnist_lenet_wide.yaml
JOBS=${JOBS:-2}
# shellcheck disable=SC2086  # BAME may be a command with arguments
$BAME data get fashion-mnist --root data
# shellcheck disable=SC2086
sweep() { $BAME sweep --config "$CONFIG" --out "$OUT" --seeds 0,1,2 --jobs "$JOBS" --no-progress "$@"; }

T=method.mask_structure=transposable
sweep --methods static,bame --patterns 2:4 --set $T method.bame.block_rows=4 "$@"
sweep --methods static,bame --patterns 1:16 --set $T method.bame.block_rows=16 "$@"
sweep --methods static,bame --patterns 2:4 "$@"

# shellcheck disable=SC2086
$BAME report "$OUT" --title "Fashion-MNIST, LeNet-5-wide: transposable N:M masks against row masks"
