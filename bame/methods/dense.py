"""``dense``: no sparsity. The model is left exactly as built (no layer is swapped, no mask exists)."""

from __future__ import annotations

from .base import Method, register

__all__ = ["Dense"]


@register("dense")
class Dense(Method):
    """Plain dense training; every hook is the base class's no-op."""
