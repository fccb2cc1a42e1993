"""``srste``: STE plus the sparse-refined decay ``lambda_w * (1 - m) * W`` (SR-STE)."""

from __future__ import annotations

from ..autograd import Backward
from .base import register
from .ste import STE

__all__ = ["SRSTE"]


@register("srste")
class SRSTE(STE):
    """As :class:`STE`, with weight gradient ``dL/d(W*m) + lambda_w (1 - m) W`` (``cfg.srste_decay``).

    The layers add the refined decay in their backward (``Backward.SRSTE``); ``sparsify`` passes
    ``cfg.srste_decay`` to them.
    """

    backward_mode = Backward.SRSTE
