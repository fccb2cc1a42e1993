"""``asp``: dense training, a one-shot magnitude N:M prune at a fraction of training, then static sparse."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..autograd import Backward
from ..schedule import asp_prune_step
from .base import register
from .static import Static

__all__ = ["ASP"]


@register("asp")
class ASP(Static):
    """Steps ``< p`` train dense (mask all ones, ``DENSE`` backward); at the start of step
    ``p = round_half_up(asp_prune_fraction * total_steps)`` every N:M layer is pruned to the top-N
    ``|W|`` per group, the optimizer state (momentum) of the pruned weights is reset, and the layers
    switch to ``SPARSE`` backward; from then on it is :class:`Static` (masked gradients and decay).
    ``p >= total_steps`` never prunes. Pruned weights keep their stored value (unused: the forward
    multiplies by the mask, and nothing regrows).

    Weight decay is applied by the method throughout (``mask_gradients_and_decay``): with the all-ones
    mask of the dense phase that is the ordinary decay of every weight.
    """

    backward_mode = Backward.DENSE

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.prune_step = asp_prune_step(cfg.asp_prune_fraction, ctx.total_steps)
        self.pruned = False

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        for _, layer in self.layers():
            layer.mask.fill_(True)  # dense phase; set_mask would refuse a non-N:M mask
        return model

    @property
    def regime_switch_step(self) -> int:
        return self.prune_step

    def switch_regime(self) -> None:
        self.prune()

    def update_positions(self) -> dict[torch.Tensor, torch.Tensor]:
        return super().update_positions() if self.pruned else {}  # the dense phase trains every weight

    def before_step(self, step: int) -> None:
        super().before_step(step)
        if not self.pruned and step >= self.prune_step:
            self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        """One-shot magnitude N:M prune of every N:M layer (the layer's structure: row or transposable);
        momentum of the pruned weights restarts at 0."""
        for _, layer in self.layers():
            layer.set_mask(layer.structured_mask(layer.weight.abs()))
            self.reset_optimizer_state(layer.weight, ~layer.mask)
            layer.backward_mode = Backward.SPARSE
        self.pruned = True

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": torch.tensor(self.pruned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The masks come back with the model's state dict; the backward mode is an attribute.
        self.pruned = bool(state["pruned"])
        mode = Backward.SPARSE if self.pruned else Backward.DENSE
        for _, layer in self.layers():
            layer.backward_mode = mode
