"""TensorBoard events of a run (``train.tensorboard: true``), written under ``RUN/tensorboard/``.

:class:`TensorBoardSink` wraps the run folder's writer and observes what goes through it: every row and
array is written to the folder as before, and what TensorBoard shows is taken from those same rows, so the
events hold the numbers of ``metrics.csv``, ``masks.csv``, ``adaptation.csv`` and ``blocks/``:

=====================================  =========================================================================
tag                                    from
=====================================  =========================================================================
``train/loss``, ``train/acc``,         ``metrics.csv`` train rows (and the recorders' scalars:
``train/lr``, ``train/sad_fraction``   ``train/cum_mask_flips``)
``test/loss``, ``test/acc``            ``metrics.csv`` test rows
``flops_ideal/<phase>``,               the run's cumulative FLOPs (2 x MACs) per phase (forward, input_grad,
``flops_executed/<phase>``             weight_grad, adaptation) and ``total``, at each train row
``mask_flips/<layer>``                 ``masks.csv``: the weights whose mask changed (SAD), per N:M layer
``selected_blocks/<layer>``, ...       ``adaptation.csv``: selected, frozen, candidate and designated blocks
``oscillation_frequency/<layer>``      ``blocks/step_*.npz``: a histogram of the blocks' oscillation frequency
``config``                             the resolved config (text)
=====================================  =========================================================================

The step of every event is the number of optimizer steps completed (``metrics.csv``'s ``step``; a mask
change made by step index ``t`` of ``masks.csv`` / ``adaptation.csv`` shows at ``t + 1``). Only rank 0 writes
(it alone has a run folder writer). A resume from the checkpoint at step ``S`` opens a new event file with
``purge_step = S + 1``: TensorBoard drops the events that an earlier process wrote after that checkpoint
(as the run folder's tables drop their rows), so no step appears twice. Events are flushed at every
checkpoint and every ``FLUSH_SECS`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .contract import (ADAPTATION_TABLE, FLOPS_PER_MAC, MASKS_TABLE, METRICS_COLUMNS, METRICS_TABLE,
                       block_step)

__all__ = ["TensorBoardSink", "FREQUENCY_BINS", "ADAPTATION_TAGS"]

FLUSH_SECS = 30  # how stale a live `tensorboard --logdir runs` may be
FREQUENCY_BINS = np.linspace(0.0, 1.0, 21)  # oscillation frequency lies in [0, 1]: bins of 0.05
ADAPTATION_TAGS = ("selected_blocks", "frozen_blocks", "candidate_blocks", "designated_blocks")
_FREQUENCY = ".frequency"


class TensorBoardSink:
    """The run folder's ``writer``, plus TensorBoard events in ``log_dir`` of what is written through it.

    ``config_text``: the resolved config (written once, at step 0, when ``log_dir`` has no events yet);
    ``start_step``: the steps the run has done (a resume's checkpoint step; 0 for a new run);
    ``phase_totals()``: the run's cumulative ``phase -> (ideal, executed)`` MACs when a metrics row is written.
    Any attribute it lacks is the writer's.
    """

    def __init__(self, writer: Any, log_dir: Path, *, config_text: str, start_step: int,
                 phase_totals: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = writer
        self.phase_totals = phase_totals
        fresh = not any(Path(log_dir).glob("events.out.tfevents.*"))
        self.events = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=FLUSH_SECS)
        if fresh:
            indented = "\n".join("    " + line for line in config_text.splitlines())  # markdown: a code block
            self.events.add_text("config", indented, global_step=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)

    # -- the sink and writer interface -----------------------------------------------------------
    def append(self, table: str, row: Mapping[str, Any]) -> None:
        self.writer.append(table, row)
        if table == METRICS_TABLE:
            self._metrics(row)
        elif table == MASKS_TABLE:
            self._scalar(f"mask_flips/{row['layer']}", row["flips"], int(row["step"]) + 1)
        elif table == ADAPTATION_TABLE:
            for key in ADAPTATION_TAGS:
                self._scalar(f"{key}/{row['layer']}", row.get(key), int(row["step"]) + 1)

    def append_rows(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.append(table, row)

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> None:
        self.writer.save_arrays(name, arrays)
        step = block_step(f"{name}.npz")
        if step is None:
            return
        for key, values in arrays.items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if key.endswith(_FREQUENCY) and values.size:
                self.events.add_histogram(f"oscillation_frequency/{key[:-len(_FREQUENCY)]}", values, step + 1,
                                          bins=FREQUENCY_BINS)

    def save_checkpoint(self, state: dict[str, Any]) -> Any:
        self.events.flush()  # the events up to the checkpoint are on disk before it is
        return self.writer.save_checkpoint(state)

    def close(self) -> None:
        self.events.close()
        self.writer.close()

    # -- rows --------------------------------------------------------------------------------------
    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if value is not None:
            self.events.add_scalar(tag, float(value), step)

    def _metrics(self, row: Mapping[str, Any]) -> None:
        split, step = row["split"], int(row["step"])
        for key in ("loss", "acc"):
            self._scalar(f"{split}/{key}", row.get(key), step)
        if split != "train":
            return
        self._scalar("train/lr", row.get("lr"), step)
        for key, value in row.items():  # the recorders' scalars
            if key not in METRICS_COLUMNS:
                self._scalar(f"train/{key}", value, step)
        totals = {phase: tuple(v) for phase, v in self.phase_totals().items()}
        totals["total"] = (row["cum_ideal_macs"], row["cum_executed_macs"])
        for phase, (ideal, executed) in totals.items():
            self._scalar(f"flops_ideal/{phase}", FLOPS_PER_MAC * ideal, step)
            self._scalar(f"flops_executed/{phase}", FLOPS_PER_MAC * executed, step)
