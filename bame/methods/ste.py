"""``ste``: the mask follows ``|W|`` every step; the dense weight gradient passes straight through."""

from __future__ import annotations

import torch
from torch import nn

from ..autograd import Backward
from .base import Method, register

__all__ = ["STE"]


@register("ste")
class STE(Method):
    """Sparse forward with ``mask = top-N |W|`` per group (transposable: per tile, rows and columns); the weight
    gradient is ``dL/d(W*m)`` everywhere.

    The mask is recomputed from the current weights after every optimizer step (and once before the
    first step this process runs, in case the weights changed after ``prepare``), so the mask the model
    holds always matches its weights: the forward of step ``t`` uses ``structured_mask(|W_t|)``, and evaluation
    and checkpoints see the mask of the final weights. Weight decay is the optimizer's, on every weight.
    """

    backward_mode = Backward.STE

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self._mask_fresh = False

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        self.refresh_masks()
        return model

    def flip_resets(self) -> bool:
        """Whether a mask flip restarts the optimizer state there: ``method.flip_reset``, or when that is null,
        under adam / adamw (whose per-tensor step count a restart needs to be per element) but not under sgd."""
        if self.cfg.flip_reset is not None:
            return self.cfg.flip_reset
        return self.ctx.optimizer != "sgd"

    @torch.no_grad()
    def refresh_masks(self, reset_flips: bool = False) -> None:
        """``mask <- structured_mask(|W|)`` for every N:M layer: top-N ``|W|`` per group, or under
        ``mask_structure: transposable`` the transposable mask keeping the most ``|W|`` (an exact search); with
        ``reset_flips`` the optimizer state of every position whose mask changed restarts."""
        for _, layer in self.layers():
            new = layer.structured_mask(layer.weight.abs())
            if reset_flips:
                self.reset_optimizer_state(layer.weight, new ^ layer.mask)
            layer.mask.copy_(new)
        self._mask_fresh = True

    def before_step(self, step: int) -> None:
        super().before_step(step)
        if not self._mask_fresh:
            self.refresh_masks()

    def after_optimizer_step(self, step: int) -> None:
        self.refresh_masks(reset_flips=self.flip_resets())

    def load_state_dict(self, state: dict) -> None:
        self._mask_fresh = False  # the next before_step recomputes the masks from the loaded weights
