"""``phased``: SR-STE until a switch point, then the mask is frozen and training is static.

The control that BAME's block selection has to beat at equal training FLOPs: a dense weight gradient
early (SR-STE, the mask following ``|W|``), none later (the static mask's sparse backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..autograd import Backward
from ..schedule import resolve_step
from ..schema import Section
from .base import FlopsBudget, register
from .srste import SRSTE

__all__ = ["Phased", "PhasedConfig"]


@dataclass(frozen=True)
class PhasedConfig(Section):
    """``phased``: SR-STE until ``switch_fraction`` of the training steps, then a frozen mask (static)."""

    switch_fraction: float = 0.25

    def problems(self, method: Any) -> list[tuple[str, str]]:
        if not 0.0 <= self.switch_fraction <= 1.0:
            return [("switch_fraction", f"must lie in [0, 1] (a fraction of training), got {self.switch_fraction}")]
        return []


@register("phased", config=PhasedConfig)
class Phased(SRSTE):
    """Steps ``< s = round_half_up(switch_fraction * total_steps)`` are SR-STE's; at the start of step ``s``
    the mask (top-N ``|W|`` of the weights after step ``s - 1``, as SR-STE left it) is frozen, the layers
    switch to the ``SPARSE`` backward and the optimizer state of the pruned weights restarts at zero; from
    then on it trains exactly as :class:`bame.methods.static.Static` (masked gradients and decay, pruned
    weights keep their stored value). ``s = 0`` is the static mask from init; ``s >= total_steps`` is SR-STE.

    The N:M weights sit in the optimizer's ``weight_decay=0`` group throughout and the method adds their
    decay itself: on every weight before the switch (SGD's own ``grad + wd * W``, so the steps equal
    SR-STE's bit for bit) and at the kept weights after it (as static does). Under AdamW the optimizer
    decays them instead: every weight before the switch, the kept ones after it (``update_positions``).
    """

    backward_mode = Backward.SRSTE

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.switch_step = resolve_step(None, cfg.phased.switch_fraction, ctx.total_steps)
        self.switched = False

    @property
    def regime_switch_step(self) -> int:
        return self.switch_step

    def switch_regime(self) -> None:
        self.switch()

    @classmethod
    def flops_budget(cls, cfg: Any) -> FlopsBudget:
        return FlopsBudget("method.phased.switch_fraction", 0.0, 1.0,
                           "exact: phased's cost does not depend on training")

    def self_decayed_parameters(self) -> list[nn.Parameter]:
        return self.masked_decay_weights()

    def update_positions(self) -> dict[torch.Tensor, torch.Tensor]:
        """SR-STE's (every weight) before the switch, the frozen mask after it."""
        return {layer.weight: layer.mask for _, layer in self.layers()} if self.switched else {}

    def before_step(self, step: int) -> None:
        if self.switched:  # the frozen mask stays; SR-STE's refresh would recompute it from |W|
            self.last_adaptation = None
            return
        super().before_step(step)
        if step >= self.switch_step:
            self.switch()

    @torch.no_grad()
    def switch(self) -> None:
        """Freeze every mask as it is; sparse backward; the pruned weights' optimizer state restarts at zero."""
        for _, layer in self.layers():
            layer.backward_mode = Backward.SPARSE
            self.reset_optimizer_state(layer.weight, ~layer.mask)
        self.switched = True

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self.switched:
            self.mask_gradients_and_decay()
            return
        wd = 0.0 if self.ctx.decoupled_decay else self.ctx.weight_decay
        if wd:
            for _, layer in self.layers():
                if layer.weight.grad is not None:
                    layer.weight.grad.add_(layer.weight, alpha=wd)

    def after_optimizer_step(self, step: int) -> None:
        if not self.switched:
            super().after_optimizer_step(step)

    def state_dict(self) -> dict[str, Any]:
        return {"switched": torch.tensor(self.switched)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # SR-STE: recompute the mask from the loaded weights before the switch
        self.switched = bool(state["switched"])
        mode = Backward.SPARSE if self.switched else Backward.SRSTE
        for _, layer in self.layers():
            layer.backward_mode = mode
