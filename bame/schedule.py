"""Pure functions of the optimizer step: the run's lengths, the learning-rate factor, BAME's adaptation
window, its interval, the rho decay, ASP's prune point. No state; every function takes the step and the
resolved numbers (plain numbers, not config sections).

Steps are 0-based optimizer steps ``0 .. total_steps - 1``. A fraction ``f`` of training resolves to
step ``round_half_up(f * total_steps)`` (half-up, not Python's banker's rounding, so that 0.5 of 5 steps
is step 3 on every platform and in every reading of the config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "Schedule", "plan_schedule", "LRFactor", "LR_SCHEDULES",
    "round_half_up", "resolve_step", "resolve_window", "resolve_interval", "is_adaptation_step", "adaptation_steps",
    "rho_at", "asp_prune_step", "overlay_segments", "INTERVAL_ANCHORS", "RHO_DECAYS",
]

# ``absolute``: adapt at t_i <= t < t_f with t % T == 0 (method.md, literally);
# ``t_i``:      adapt at t_i <= t < t_f with (t - t_i) % T == 0 (the first adaptation is at t_i).
# The two agree whenever t_i is a multiple of T (always with the default t_i = 0).
INTERVAL_ANCHORS = ("absolute", "t_i")
RHO_DECAYS = ("cosine", "constant")


# --------------------------------------------------------------------------------------------------
# the run's lengths and the learning rate


@dataclass(frozen=True)
class Schedule:
    """Lengths in optimizer steps (see :func:`plan_schedule` for the rule)."""

    steps_per_epoch: int
    schedule_steps: int  # LR schedule and method windows
    run_steps: int  # where this run stops
    warmup_steps: int
    eval_interval_steps: int  # 0: evaluate only at the end


def plan_schedule(steps_per_epoch: int, epochs: float, max_steps: Optional[int] = None,
                  warmup_epochs: float = 0.0, eval_every_epochs: float = 1.0) -> Schedule:
    """The run's lengths from ``S = steps_per_epoch``, one rule:

    - **schedule length** = ``ceil(epochs * S)``: the LR schedule and the method's windows follow it; with
      ``epochs <= 0`` (only with ``max_steps``) it is ``max_steps``.
    - **run length** = ``min(schedule length, max_steps)``: where this run stops. A run stopped by
      ``max_steps`` is the prefix of the full schedule, and can be resumed to a larger ``max_steps``.
    """
    if steps_per_epoch < 1:
        raise ValueError("the training set gives no batch: is it empty, or smaller than one batch with drop_last?")
    if epochs > 0:
        # ceil: a fractional epoch still takes its partial steps (rounded first: 1.1 * 10 is 11.000000000000002)
        schedule = max(1, math.ceil(round(epochs * steps_per_epoch, 6)))
    elif max_steps is not None:
        schedule = max_steps
    else:
        raise ValueError("train.epochs: must be > 0 (or set train.max_steps)")
    run = min(schedule, max_steps) if max_steps is not None else schedule
    warmup = round(warmup_epochs * steps_per_epoch)
    eval_every = max(1, round(eval_every_epochs * steps_per_epoch)) if eval_every_epochs > 0 else 0
    return Schedule(steps_per_epoch, schedule, run, warmup, eval_every)


LR_SCHEDULES = ("cosine", "step", "constant")


class LRFactor:
    """LR multiplier at optimizer step ``t`` (0-based): linear warm-up, then cosine / step / constant.

    Warm-up: ``s + (1 - s) (t + 1) / warmup_steps`` for ``t < warmup_steps`` (``s = start_factor``, 0 by
    default). Cosine: ``f + (1 - f) 0.5 (1 + cos(pi p))`` with ``p = (t - warmup) / (total - warmup)`` and
    ``f = min_factor`` (0 by default). Step: ``gamma ** #{milestones m : t >= m * total}``.
    DeiT's recipe (timm's cosine scheduler, per epoch: from 1e-6 up to lr, then down to 1e-5) is
    ``start_factor = 1e-6 / lr``, ``min_factor = 1e-5 / lr``, here per step.
    A callable object (not a lambda) so that ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0,
                 milestones: tuple[float, ...] = (), gamma: float = 0.1, start_factor: float = 0.0,
                 min_factor: float = 0.0) -> None:
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)
        self.start_factor = float(start_factor)
        self.min_factor = float(min_factor)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * (t + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            p = min(1.0, (t - self.warmup_steps) / span)
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if t >= m * self.total_steps)
        if self.kind == "constant":
            return 1.0
        raise ValueError(f"unknown lr_schedule {self.kind!r}")


# --------------------------------------------------------------------------------------------------
# a method's steps


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


def coalesce_segments(segments: list[tuple[int, int, dict[str, int]]]) -> list[tuple[int, int, dict[str, int]]]:
    """Sorted disjoint ``(start, stop, blocks)`` segments with each run of touching segments of equal blocks
    joined into one (a designation re-made every step is one segment, not one per step)."""
    out: list[tuple[int, int, dict[str, int]]] = []
    for start, stop, blocks in segments:
        if out and out[-1][1] == start and (out[-1][2] is blocks or out[-1][2] == blocks):
            out[-1] = (out[-1][0], stop, blocks)
        else:
            out.append((start, stop, blocks))
    return out


def overlay_segments(a: list[tuple[int, int, dict[str, int]]], b: list[tuple[int, int, dict[str, int]]],
                     stop_at: int) -> list[tuple[int, int, dict[str, int]]]:
    """Two sorted lists of disjoint ``(start, stop, blocks)`` step segments (``blocks``: per layer) as one, cut
    at every boundary, blocks per layer the larger of the two where they overlap, clipped to ``[0, stop_at)``.
    (BAME's scoring windows and designation windows: without freezing a designated block is a candidate too.)"""
    bounds = sorted({x for start, stop, _ in a + b for x in (start, stop) if x < stop_at} | {stop_at})
    out, i, j = [], 0, 0
    for lo, hi in zip(bounds, bounds[1:]):
        while i < len(a) and a[i][1] <= lo:
            i += 1
        while j < len(b) and b[j][1] <= lo:
            j += 1
        here = [segs[k][2] for segs, k in ((a, i), (b, j)) if k < len(segs) and segs[k][0] <= lo]
        if here:
            out.append((lo, hi, {n: max(h.get(n, 0) for h in here) for n in here[0]}))
    return out
