"""``static``: a fixed N:M mask from init with sparse forward and backward (BAME without adaptation)."""

from __future__ import annotations

import torch
from torch import nn

from ..autograd import Backward
from .base import Method, register

__all__ = ["Static"]


@register("static")
class Static(Method):
    """Sparsify with ``SPARSE`` backward; the mask (``cfg.mask_init``: magnitude or random) never changes.

    The weight gradient is computed at the kept positions only. ``after_backward`` masks the gradients
    and adds the weight decay at the kept positions (``mask_gradients_and_decay``); the loop puts the
    N:M weights in a ``weight_decay=0`` optimizer group (``self_decayed_parameters``), so pruned weights
    keep their stored value bit for bit and their momentum stays zero. Under Adam / AdamW the optimizer
    moves the N:M weights at the mask only (``update_positions``), where AdamW also decays them.
    """

    backward_mode = Backward.SPARSE

    def self_decayed_parameters(self) -> list[nn.Parameter]:
        return self.masked_decay_weights()

    def update_positions(self) -> dict[torch.Tensor, torch.Tensor]:
        return {layer.weight: layer.mask for _, layer in self.layers()}

    def after_backward(self, step: int) -> None:
        self.mask_gradients_and_decay()
