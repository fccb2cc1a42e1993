"""Pure functions of the optimizer step: BAME's adaptation window, its interval, the rho decay, ASP's
prune point. No state; every function takes the step and the resolved numbers.

Steps are 0-based optimizer steps ``0 .. total_steps - 1``. A fraction ``f`` of training resolves to
step ``round_half_up(f * total_steps)`` (half-up, not Python's banker's rounding, so that 0.5 of 5 steps
is step 3 on every platform and in every reading of the config).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = [
    "round_half_up", "resolve_step", "resolve_window", "resolve_interval", "is_adaptation_step", "adaptation_steps",
    "rho_at", "asp_prune_step", "INTERVAL_ANCHORS", "RHO_DECAYS",
]

# ``absolute``: adapt at t_i <= t < t_f with t % T == 0 (method.md, literally);
# ``t_i``:      adapt at t_i <= t < t_f with (t - t_i) % T == 0 (the first adaptation is at t_i).
# The two agree whenever t_i is a multiple of T (always with the default t_i = 0).
INTERVAL_ANCHORS = ("absolute", "t_i")
RHO_DECAYS = ("cosine", "constant")


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: deterministic rounding of non-negative step counts."""
    return int(math.floor(x + 0.5))


def resolve_step(steps: Optional[int], fraction: float, total_steps: int) -> int:
    """``steps`` when given, else ``round_half_up(fraction * total_steps)``; clamped to ``[0, total_steps]``."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    value = int(steps) if steps is not None else round_half_up(float(fraction) * total_steps)
    return max(0, min(value, total_steps))


def resolve_window(t_i_steps: Optional[int], t_i_fraction: float, t_f_steps: Optional[int],
                   t_f_fraction: float, total_steps: int) -> tuple[int, int]:
    """The adaptation window ``[t_i, t_f)`` in steps; raises ``ValueError`` if ``t_i > t_f``."""
    t_i = resolve_step(t_i_steps, t_i_fraction, total_steps)
    t_f = resolve_step(t_f_steps, t_f_fraction, total_steps)
    if t_i > t_f:
        raise ValueError(f"adaptation window starts after it ends: t_i={t_i} > t_f={t_f} "
                         f"(total_steps={total_steps})")
    return t_i, t_f


def resolve_interval(steps: int, fraction: Optional[float], total_steps: int) -> int:
    """The adaptation interval ``T`` in steps: ``steps``, or when ``fraction`` is given (it replaces
    ``steps``) ``max(1, round_half_up(fraction * total_steps))``. Raises ``ValueError`` if ``T < 1``."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    value = int(steps) if fraction is None else max(1, round_half_up(float(fraction) * total_steps))
    if value < 1:
        raise ValueError(f"adaptation interval must be >= 1, got {value}")
    return value


def is_adaptation_step(step: int, t_i: int, t_f: int, interval: int, anchor: str = "absolute") -> bool:
    """True when the mask is adapted at ``step``: ``t_i <= step < t_f`` and the interval condition.

    ``anchor='absolute'`` (default, method.md's ``t % T == 0``) or ``'t_i'`` (``(t - t_i) % T == 0``).
    """
    if interval < 1:
        raise ValueError(f"adaptation interval must be >= 1, got {interval}")
    if anchor not in INTERVAL_ANCHORS:
        raise ValueError(f"unknown interval anchor {anchor!r}: use one of {list(INTERVAL_ANCHORS)}")
    if not t_i <= step < t_f:
        return False
    offset = step if anchor == "absolute" else step - t_i
    return offset % interval == 0


def adaptation_steps(t_i: int, t_f: int, interval: int, anchor: str = "absolute") -> list[int]:
    """Every adaptation step of the window, in order (without visiting the steps in between)."""
    if interval < 1:
        raise ValueError(f"adaptation interval must be >= 1, got {interval}")
    if anchor not in INTERVAL_ANCHORS:
        raise ValueError(f"unknown interval anchor {anchor!r}: use one of {list(INTERVAL_ANCHORS)}")
    origin = 0 if anchor == "absolute" else t_i
    first = t_i + (origin - t_i) % interval  # the first step >= t_i on the interval's grid
    return list(range(first, t_f, interval))


def rho_at(step: int, rho: float, t_i: int, t_f: int, decay: str = "cosine") -> float:
    """Fraction of a layer's blocks that may change at ``step``.

    Inside ``[t_i, t_f)``: ``rho`` (``constant``) or ``rho * (1 + cos(pi * (step - t_i) / (t_f - t_i))) / 2``
    (``cosine``: ``rho`` at ``t_i``, reaching 0 at ``t_f``). Outside the window: 0 (no adaptation).
    """
    if decay not in RHO_DECAYS:
        raise ValueError(f"unknown rho decay {decay!r}: use one of {list(RHO_DECAYS)}")
    if not t_i <= step < t_f:
        return 0.0
    if decay == "constant":
        return float(rho)
    progress = (step - t_i) / (t_f - t_i)
    return float(rho) * 0.5 * (1.0 + math.cos(math.pi * progress))


def asp_prune_step(fraction: float, total_steps: int) -> int:
    """ASP's one-shot prune step: steps ``< p`` train dense, steps ``>= p`` train sparse."""
    return resolve_step(None, fraction, total_steps)
