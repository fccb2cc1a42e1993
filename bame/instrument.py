"""Recorders: observe the masks and BAME's adaptation decisions, never change training.

``Recorders(cfg, model, method, sink)`` is called once per optimizer step, after the optimizer step and
the method's mask changes (docs/contracts.md). It writes through ``sink`` only:

- ``masks.csv`` (``instrument.mask_flips``): ``step, layer, flips, flip_fraction`` -- the SAD of each
  N:M layer (positions whose mask changed since the previous step, and that count over the layer's
  weights). Rows are written for every N:M layer on each step where at least one mask changed; a
  step without rows changed no mask. ``on_step_end`` returns ``sad_fraction`` (this step's flips over
  all N:M weights) and ``cum_mask_flips`` (flips since the start: the metrics row is written only
  every few steps, and differences of this column give the flips in between).
- ``adaptation.csv``: one row per layer per adaptation step (``method.last_adaptation``).
- ``blocks/step_XXXXXXXX.npz`` every ``block_state_every_adaptations`` adaptation steps (the first
  one included): per layer ``<layer>.frequency`` (float16, in [0, 1]), ``<layer>.frozen`` (bool),
  ``<layer>.last_score`` (float32: LMA scores are products ``g * w`` of order 1e-4..1e-8, below
  float16's normal range, so float16 would flush them to zero or keep a few bits) and
  ``<layer>.changes`` (int16, int32 past 32767).

Cost: per step one element-wise comparison of each N:M mask with a previous copy kept on the mask's
device (one byte per weight), one host sync for all the counts, and a copy only for layers that changed.
Nothing here draws random numbers, writes to the model or the method, or touches gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .contract import ADAPTATION_COLUMNS, ADAPTATION_TABLE, MASKS_TABLE, block_name
from .layers import NMLayer, nm_layers

__all__ = ["InstrumentConfig", "Recorders", "NullSink", "adaptation_rows", "block_arrays", "ADAPTATION_COLUMNS"]

FREQ_QUANTILE = 0.9  # freq_p90


@dataclass(frozen=True)
class InstrumentConfig:
    """The ``instrument`` section of the config: what the ledger and the recorders keep."""

    flops: bool = True  # exact per-step FLOPs ledger
    mask_flips: bool = True  # SAD per layer per logged step
    block_state_every_adaptations: int = 1  # save BAME per-block state every k adaptation steps (0: never)


def _numpy(t: Any) -> Optional[np.ndarray]:
    if t is None:
        return None
    if torch.is_tensor(t):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def adaptation_rows(record) -> list[dict[str, Any]]:
    """The ``adaptation.csv`` rows (one per layer) of an :class:`bame.methods.AdaptationRecord`."""
    rows = []
    for la in record.layers:
        freq = _numpy(la.frequency)
        stats = la.score_stats or {}
        rows.append(dict(
            step=int(record.step), layer=la.layer, rho=float(record.rho), num_blocks=int(la.num_blocks),
            candidate_blocks=int(la.candidate_blocks), frozen_blocks=int(la.frozen_blocks),
            selected_blocks=int(la.selected_blocks), swaps=int(la.swaps),
            oscillation_events=int(la.oscillation_events),
            score_mean=float(stats["mean"]) if "mean" in stats else None,
            score_max=float(stats["max"]) if "max" in stats else None,
            freq_mean=float(freq.astype(np.float64).mean()) if freq is not None and freq.size else None,
            freq_p90=float(np.quantile(freq.astype(np.float64), FREQ_QUANTILE)) if freq is not None and freq.size
            else None,
            frozen_fraction=la.frozen_blocks / la.num_blocks if la.num_blocks else 0.0,
            designated_blocks=int(la.designated_blocks),
        ))
    return rows


def block_arrays(record) -> dict[str, np.ndarray]:
    """The per-block arrays of an adaptation record, keyed ``<layer>.<name>``, in compact dtypes."""
    out: dict[str, np.ndarray] = {}
    for la in record.layers:
        freq, frozen, score, changes = (_numpy(la.frequency), _numpy(la.frozen), _numpy(la.last_score),
                                        _numpy(la.changes))
        if freq is not None:
            out[f"{la.layer}.frequency"] = freq.astype(np.float16)
        if frozen is not None:
            out[f"{la.layer}.frozen"] = frozen.astype(bool)
        if score is not None:
            out[f"{la.layer}.last_score"] = score.astype(np.float32)
        if la.designated is not None:
            out[f"{la.layer}.designated"] = _numpy(la.designated).astype(bool)
        if changes is not None:
            big = changes.size and int(np.abs(changes).max()) > np.iinfo(np.int16).max
            out[f"{la.layer}.changes"] = changes.astype(np.int32 if big else np.int16)
    return out


class NullSink:
    """A sink that keeps nothing: the recorders' until a run folder exists, or where only their cost counts."""

    def append(self, table: str, row: dict[str, Any]) -> None:
        pass

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        pass


class Recorders:
    """Mask flips (SAD) per step and layer; BAME's per-layer adaptation rows and block snapshots.

    ``sink`` has ``append(table, row)`` and ``save_arrays(name, arrays)`` (a run folder writer).
    """

    def __init__(self, cfg: InstrumentConfig, model: nn.Module, method: Any, sink: Any) -> None:
        self.cfg = cfg
        self.model = model
        self.method = method
        self.sink = sink
        self.adaptations_seen = 0  # adaptation records observed (for block_state_every_adaptations)
        self.cum_mask_flips = 0  # flips over every N:M layer since the start of the run
        self.last_adaptation_step: Optional[int] = None
        self._prev: dict[str, torch.Tensor] = {}  # layer -> mask after the previous step (bool, same device)
        if cfg.mask_flips:
            for name, layer in nm_layers(model):
                self._prev[name] = layer.mask.detach().clone()

    # -- per step --------------------------------------------------------------------------------
    def on_step_end(self, step: int) -> dict[str, float]:
        """Record this step; returns ``sad_fraction`` and ``cum_mask_flips`` when mask flips are recorded
        (and the model has N:M layers), else nothing."""
        scalars: dict[str, float] = {}
        if self.cfg.mask_flips:
            sad = self._mask_flips(step)
            if sad is not None:
                scalars["sad_fraction"] = sad
                scalars["cum_mask_flips"] = float(self.cum_mask_flips)
        record = self.method.last_adaptation
        if record is not None and record.step != self.last_adaptation_step:
            self._adaptation(record)
        return scalars

    @torch.no_grad()
    def _mask_flips(self, step: int) -> Optional[float]:
        layers: list[tuple[str, NMLayer]] = list(nm_layers(self.model))
        if not layers:
            return None
        counts = []
        for name, layer in layers:
            mask = layer.mask
            prev = self._prev.get(name)
            if prev is None or prev.shape != mask.shape:  # a layer that appeared since: nothing to compare
                prev = self._prev[name] = mask.detach().clone()
            elif prev.device != mask.device:
                prev = self._prev[name] = prev.to(mask.device)
            counts.append(torch.ne(mask, prev).sum())
        # one host sync for every layer (counts may live on different devices only in exotic set-ups)
        flips = [int(c) for c in torch.stack([c.to(counts[0].device) for c in counts]).tolist()]
        total = sum(flips)
        self.cum_mask_flips += total
        numel = sum(layer.mask.numel() for _, layer in layers)
        if total:
            for (name, layer), f in zip(layers, flips):
                if f:
                    self._prev[name].copy_(layer.mask)
                self.sink.append(MASKS_TABLE, dict(step=int(step), layer=name, flips=f,
                                               flip_fraction=f / layer.mask.numel()))
        return total / numel if numel else 0.0

    def _adaptation(self, record) -> None:
        for row in adaptation_rows(record):
            self.sink.append(ADAPTATION_TABLE, row)
        every = self.cfg.block_state_every_adaptations
        if every and self.adaptations_seen % every == 0:
            self.sink.save_arrays(block_name(record.step), block_arrays(record))
        self.adaptations_seen += 1
        self.last_adaptation_step = int(record.step)

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and the previous masks (bit-packed), so a resumed run counts the next flips right
        whatever order the model and the recorders are restored in."""
        packed = {name: torch.from_numpy(np.packbits(prev.cpu().numpy().reshape(-1)))
                  for name, prev in self._prev.items()}
        shapes = {name: list(prev.shape) for name, prev in self._prev.items()}
        return {"adaptations_seen": self.adaptations_seen, "cum_mask_flips": self.cum_mask_flips,
                "last_adaptation_step": -1 if self.last_adaptation_step is None else self.last_adaptation_step,
                "prev_masks": packed, "prev_shapes": shapes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adaptations_seen = int(state.get("adaptations_seen", 0))
        self.cum_mask_flips = int(state.get("cum_mask_flips", 0))
        last = int(state.get("last_adaptation_step", -1))
        self.last_adaptation_step = None if last < 0 else last
        if not self.cfg.mask_flips:
            return
        devices = {name: layer.mask.device for name, layer in nm_layers(self.model)}
        for name, packed in state.get("prev_masks", {}).items():
            shape = tuple(state["prev_shapes"][name])
            n = int(np.prod(shape))
            bits = np.unpackbits(packed.cpu().numpy() if torch.is_tensor(packed) else np.asarray(packed))[:n]
            self._prev[name] = torch.from_numpy(bits.astype(bool).reshape(shape)).to(
                devices.get(name, torch.device("cpu")))
