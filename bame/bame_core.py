"""Pure BAME math on blocks: LMA swap scores, OBF oscillation tracking and freezing, block selection,
and the element-wise work they cost. Tensors in, tensors out; nothing here keeps state.

Shapes
------
A layer's weight ``w``, its gradient ``g = dL/d(W*m)`` and its mask ``mask`` in block form
(:func:`bame.nm.to_blocks`) are ``[B, G, m]``: ``B`` blocks of ``G`` groups of ``m`` weights. Every
group holds exactly ``n`` kept weights. Per-block quantities are ``[B]``.

LMA: the swap score
-------------------
A swap ``(i, j)`` prunes a kept ``i`` and enables a pruned ``j`` *of the same group* (so every group keeps
exactly ``n``). Its score is written ``R = a_i - b_j`` with a per-weight "drop value" ``a`` (the higher,
the better to prune) and "grow cost" ``b`` (the lower, the better to enable):

- ``taylor`` (default, method.md): ``a = b = g * w``, so ``R = g_i w_i - g_j w_j``, the first-order
  loss reduction of dropping ``i`` (``-g_i w_i``) and enabling ``j`` at its stored value (``+g_j w_j``).
  With ``regrow: zero`` the score is still this one (method.md defines it with the stored value).
- ``gradient`` (RigL-style regrowth): ``a = -|g w|`` (drop the kept weight of smallest saliency) and
  ``b = -s |g|`` (grow the pruned weight of largest gradient magnitude), i.e.
  ``R = s |g_j| - |g_i w_i|``. ``s`` is a per-layer magnitude (the mean ``|w|`` of the layer's kept
  weights, :func:`gradient_grow_scale`): a regrown weight that moves against its gradient to a typical
  kept magnitude lowers the loss by about ``s |g_j|``, which makes both terms a loss change. ``R`` is
  separable, so the chosen pair is exactly the (argmin ``|g w|``, argmax ``|g|``) pair of RigL.

With ``swaps_per_block = k``: in each group the r-th best kept (by ``a``, descending) is paired with the
r-th best pruned (by ``b``, ascending), ``r < min(n, m - n)``; those pair scores fall with ``r``. The block
takes its ``k`` best pairs over all its groups by ``R`` (ties: lower group, then lower ``r``). Pairs never
conflict (distinct ``r`` use distinct weights), and because ``R`` falls with ``r`` the greedy choice
maximises the total. The best pair is always in the plan; further pairs only when their ``R > 0``.
The block score is ``R_b = R_(1) + sum_{r>=2} max(R_(r), 0)``: the best pair's score for ``k = 1``, the
total expected loss reduction of the block's plan otherwise. Non-finite scores become ``-inf``.

OBF: oscillation tracking
-------------------------
A block **oscillates** when a change returns it to the state it had before its previous change
(A -> B -> A): each block keeps ``prev_state`` (its mask before its last change) and ``has_prev``.
The frequency is an EMA ``f <- beta f + (1 - beta) event`` over either the blocks that changed
(``update_on='changed'``, default) or every candidate block (``'candidates'``; event 0 for a block that
did not oscillate). A block freezes when ``f >= tau`` and it changed at least ``min_changes`` times
(``f`` optionally bias-corrected, ``f / (1 - beta^updates)``). A block whose selected change is an
oscillation still makes it (returning to A) and is then frozen there.

Selection
---------
``freeze_then_topk``: among candidate, non-frozen blocks with ``R_b > 0``, the ``budget`` best by ``R_b``.
``joint``: among candidate blocks with ``R_b > 0``, the ``budget`` best by ``R_b / (1 + lambda f_b)``;
nothing is frozen. Ties go to the lower block index (stable sort), so decisions are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from .schedule import round_half_up

__all__ = [
    "LMA_SCORES", "SELECTIONS", "OBF_UPDATES", "ROUNDINGS",
    "BlockSwaps", "pairs_per_group", "gradient_grow_scale", "swap_values", "block_swaps",
    "apply_swaps", "magnitude_blocks", "block_equal", "OBFState", "oscillation_events", "obf_step", "effective_frequency",
    "selection_budget", "selection_key", "select_blocks", "adaptation_elementwise_ops", "top_k_elementwise_ops",
    "selection_elementwise_ops", "magnitude_elementwise_ops", "obf_elementwise_ops", "DESIGNATED_GRADS", "PRUNED_UPDATES", "REGROW_RULES", "REGROW_VALUES", "DESIGNATIONS",
]

LMA_SCORES = ("taylor", "gradient")
SELECTIONS = ("freeze_then_topk", "joint")
OBF_UPDATES = ("changed", "candidates")
ROUNDINGS = ("round", "ceil", "floor")
DESIGNATED_GRADS = ("adaptation", "window")
PRUNED_UPDATES = ("frozen", "train")
REGROW_RULES = ("lma", "magnitude")
REGROW_VALUES = ("stored", "zero")  # a regrown weight starts from its stored value, or from zero
DESIGNATIONS = ("topk", "progressive")

Scalar = Union[float, torch.Tensor]


def _check_blocks(w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> None:
    if w.dim() != 3 or w.shape != g.shape or w.shape != mask.shape:
        raise ValueError(f"block tensors must share one shape [B, G, m]: w {tuple(w.shape)}, "
                         f"g {tuple(g.shape)}, mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")


def pairs_per_group(n: int, m: int, swaps_per_block: int) -> int:
    """How many (kept, pruned) pairs of one group are scored: 1 for single swaps, else ``min(n, m-n)``."""
    if not 1 <= n < m:
        raise ValueError(f"swaps need a sparse pattern with 1 <= n < m, got {n}:{m}")
    return 1 if swaps_per_block <= 1 else min(n, m - n)


def gradient_grow_scale(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|w|`` of the kept weights (0-dim tensor on ``w``'s device): ``s`` of the ``gradient`` score."""
    kept = mask.to(w.dtype)
    return (w.abs() * kept).sum() / kept.sum().clamp(min=1)


def swap_values(w: torch.Tensor, g: torch.Tensor, lma: str = "taylor",
                grow_scale: Optional[Scalar] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight ``(a, b)`` of the swap score ``R = a_i - b_j`` (see the module docstring)."""
    if lma == "taylor":
        s = g * w
        return s, s
    if lma == "gradient":
        if grow_scale is None:
            raise ValueError("lma 'gradient' needs grow_scale (see gradient_grow_scale)")
        return -(g * w).abs(), -(g.abs() * grow_scale)
    raise ValueError(f"unknown lma score {lma!r}: use one of {list(LMA_SCORES)}")


@dataclass(frozen=True)
class BlockSwaps:
    """Each block's best swap plan (whether a block is selected is decided elsewhere)."""

    score: torch.Tensor  # [B] R_b (float; -inf where no finite pair)
    drop: torch.Tensor  # [B, G, m] bool: kept weights the plan prunes
    grow: torch.Tensor  # [B, G, m] bool: pruned weights the plan enables
    num_swaps: torch.Tensor  # [B] int64: pairs in the plan (>= 1)
    pair_scores: torch.Tensor  # [B, k] R of the plan's k best pairs, best first (-inf if not finite)


def block_swaps(w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, n: int, lma: str = "taylor",
                swaps_per_block: int = 1, grow_scale: Optional[Scalar] = None, *,
                _force_sort: bool = False) -> BlockSwaps:
    """Score every block's best swap(s). ``w``, ``g``, ``mask``: ``[B, G, m]``; exactly ``n`` kept per group.

    One swap per block (the default) takes arg-max/arg-min instead of sorts (same result, ties included:
    both pick the first position); ``_force_sort`` runs the general path (tests compare the two).
    """
    _check_blocks(w, g, mask)
    nb, gpb, m = w.shape
    pairs = pairs_per_group(n, m, swaps_per_block)
    k = min(int(swaps_per_block), gpb * pairs)
    if k < 1:
        raise ValueError(f"swaps_per_block must be >= 1, got {swaps_per_block}")
    a, b = swap_values(w, g, lma, grow_scale)
    inf = torch.tensor(float("inf"), dtype=a.dtype, device=a.device)
    if pairs == 1 and k == 1 and not _force_sort:
        return _single_swaps(a, b, mask, inf)
    # Kept weights by drop value, descending; pruned weights by grow cost, ascending. Stable: ties go to
    # the lower position. Positions of the other set sort last (-inf / +inf).
    kept_sorted, kept_pos = torch.sort(torch.where(mask, a, -inf), dim=-1, descending=True, stable=True)
    pruned_sorted, pruned_pos = torch.sort(torch.where(mask, inf, b), dim=-1, stable=True)
    r = kept_sorted[..., :pairs] - pruned_sorted[..., :pairs]  # [B, G, pairs]: r-th kept with r-th pruned
    r = torch.where(torch.isfinite(r), r, -inf)
    flat = r.reshape(nb, gpb * pairs)  # index = group * pairs + rank
    top, top_idx = torch.sort(flat, dim=1, descending=True, stable=True)
    top, top_idx = top[:, :k], top_idx[:, :k]  # [B, k]
    take = top > 0
    take[:, 0] = True  # the best pair is always the plan's first swap
    score = top[:, 0] + top[:, 1:].clamp(min=0).sum(dim=1)
    group = top_idx // pairs
    kept_pos = kept_pos[..., :pairs].reshape(nb, gpb * pairs).gather(1, top_idx)  # [B, k] position in group
    pruned_pos = pruned_pos[..., :pairs].reshape(nb, gpb * pairs).gather(1, top_idx)
    drop = torch.zeros(nb, gpb * m, dtype=torch.bool, device=w.device)
    grow = torch.zeros_like(drop)
    # Distinct pairs address distinct weights, so the scatters never collide.
    drop.scatter_(1, group * m + kept_pos, take)
    grow.scatter_(1, group * m + pruned_pos, take)
    return BlockSwaps(score, drop.reshape(nb, gpb, m), grow.reshape(nb, gpb, m), take.sum(dim=1), top)


def _single_swaps(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, inf: torch.Tensor) -> BlockSwaps:
    """``block_swaps`` for one pair per group and one swap per block, without sorting.

    The general path's stable sorts put the first of equal values first; ``max``/``min`` along a dim and
    ``argmax`` return the first maximal (minimal) position too, so the plan is the same.
    """
    nb, gpb, m = a.shape
    best_kept, kept_pos = torch.where(mask, a, -inf).max(dim=-1)  # [B, G]: the kept weight to drop
    best_pruned, pruned_pos = torch.where(mask, inf, b).min(dim=-1)  # [B, G]: the pruned weight to grow
    r = best_kept - best_pruned
    r = torch.where(torch.isfinite(r), r, -inf)  # [B, G]
    group = r.argmax(dim=1, keepdim=True)  # [B, 1]: the block's best group (first of equals)
    top = r.gather(1, group)  # [B, 1]
    drop = torch.zeros(nb, gpb * m, dtype=torch.bool, device=a.device)
    grow = torch.zeros_like(drop)
    take = torch.ones_like(top, dtype=torch.bool)
    drop.scatter_(1, group * m + kept_pos.gather(1, group), take)
    grow.scatter_(1, group * m + pruned_pos.gather(1, group), take)
    return BlockSwaps(top[:, 0], drop.reshape(nb, gpb, m), grow.reshape(nb, gpb, m), take.sum(dim=1), top)


def apply_swaps(mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor,
                selected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mask`` with the swaps of the ``selected`` blocks (``[B]`` bool; all when None) applied."""
    new = (mask & ~drop) | grow
    if selected is None:
        return new
    return torch.where(selected.view(-1, *([1] * (mask.dim() - 1))), new, mask)


def magnitude_blocks(w: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, G, m]`` bool: the ``n`` largest ``|w|`` of every group (SR-STE's rule inside a block).

    Ties go to the earlier position (a stable sort), so the choice is deterministic on every rank.
    """
    if w.dim() != 3:
        raise ValueError(f"magnitude_blocks takes block form [B, G, m], got shape {tuple(w.shape)}")
    nb, gpb, m = w.shape
    if not 1 <= n <= m:
        raise ValueError(f"magnitude_blocks: cannot keep {n} of every {m}")
    order = torch.sort(w.detach().abs(), dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    return keep.scatter_(-1, order, True)


def block_equal(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: block ``b`` of ``x`` equals block ``b`` of ``y`` everywhere."""
    return (x == y).reshape(x.shape[0], -1).all(dim=1)


@dataclass(frozen=True)
class OBFState:
    """Per-block OBF state of one layer (all ``[B]`` except ``prev_state``)."""

    frequency: torch.Tensor  # float32: EMA of oscillation events
    updates: torch.Tensor  # int64: how many EMA updates the block had (for bias correction)
    changes: torch.Tensor  # int64: how often the block's mask changed
    frozen: torch.Tensor  # bool
    prev_state: torch.Tensor  # [B, G, m] bool: the block's mask before its last change
    has_prev: torch.Tensor  # bool: the block changed at least once (prev_state is meaningful)

    @classmethod
    def initial(cls, num_blocks: int, groups_per_block: int, m: int,
                device: torch.device | str | None = None) -> OBFState:
        z = dict(device=device)
        return cls(torch.zeros(num_blocks, dtype=torch.float32, **z),
                   torch.zeros(num_blocks, dtype=torch.int64, **z),
                   torch.zeros(num_blocks, dtype=torch.int64, **z),
                   torch.zeros(num_blocks, dtype=torch.bool, **z),
                   torch.zeros(num_blocks, groups_per_block, m, dtype=torch.bool, **z),
                   torch.zeros(num_blocks, dtype=torch.bool, **z))

    def to(self, device: torch.device | str) -> OBFState:
        return OBFState(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.frequency, self.updates, self.changes, self.frozen, self.prev_state, self.has_prev)


def oscillation_events(old_blocks: torch.Tensor, new_blocks: torch.Tensor, state: OBFState) -> torch.Tensor:
    """``[B]`` bool: the block changes now and returns to the state before its previous change."""
    changed = ~block_equal(old_blocks, new_blocks)
    return changed & state.has_prev & block_equal(new_blocks, state.prev_state)


def effective_frequency(state: OBFState, beta: float, bias_correction: bool = False) -> torch.Tensor:
    """The frequency compared with ``tau``: ``f`` or ``f / (1 - beta^updates)`` (0 before any update)."""
    if not bias_correction:
        return state.frequency
    denom = 1.0 - torch.pow(torch.full_like(state.frequency, beta), state.updates.to(state.frequency.dtype))
    return torch.where(state.updates > 0, state.frequency / denom.clamp(min=1e-12),
                       torch.zeros_like(state.frequency))


def obf_step(state: OBFState, old_blocks: torch.Tensor, new_blocks: torch.Tensor, candidates: torch.Tensor,
             beta: float, tau: float, min_changes: int, update_on: str = "changed",
             freeze: bool = True, bias_correction: bool = False) -> tuple[OBFState, torch.Tensor]:
    """One adaptation's OBF update of a layer. Returns ``(new_state, events)``.

    ``old_blocks``/``new_blocks``: ``[B, G, m]`` masks before/after this adaptation; ``candidates``: ``[B]``.
    ``freeze=False`` tracks frequencies but freezes nothing (``obf: false`` or ``selection: joint``).
    Frozen blocks stay frozen (until t_f, after which nothing adapts).
    """
    if update_on not in OBF_UPDATES:
        raise ValueError(f"unknown OBF update rule {update_on!r}: use one of {list(OBF_UPDATES)}")
    changed = ~block_equal(old_blocks, new_blocks)
    events = oscillation_events(old_blocks, new_blocks, state)
    update = changed if update_on == "changed" else (candidates | changed)
    ema = beta * state.frequency + (1.0 - beta) * events.to(state.frequency.dtype)
    frequency = torch.where(update, ema, state.frequency)
    updates = state.updates + update.to(torch.int64)
    changes = state.changes + changed.to(torch.int64)
    prev_state = torch.where(changed.view(-1, 1, 1), old_blocks, state.prev_state)
    has_prev = state.has_prev | changed
    new = replace(state, frequency=frequency, updates=updates, changes=changes, prev_state=prev_state,
                  has_prev=has_prev)
    if freeze:
        f = effective_frequency(new, beta, bias_correction)
        new = replace(new, frozen=state.frozen | ((f >= tau) & (changes >= min_changes)))
    return new, events


def selection_budget(rho: float, num_blocks: int, rounding: str = "round") -> int:
    """How many blocks of a layer may change: ``rounding(rho * num_blocks)``, within ``[0, num_blocks]``."""
    x = float(rho) * num_blocks
    if rounding == "round":
        k = round_half_up(x)
    elif rounding == "ceil":
        k = math.ceil(x - 1e-9)  # 1e-9: 0.05 * 100 must not become 6 through float error
    elif rounding == "floor":
        k = math.floor(x + 1e-9)
    else:
        raise ValueError(f"unknown rounding {rounding!r}: use one of {list(ROUNDINGS)}")
    return max(0, min(int(k), num_blocks))


def selection_key(score: torch.Tensor, frequency: torch.Tensor, selection: str = "freeze_then_topk",
                  joint_lambda: float = 1.0) -> torch.Tensor:
    """What blocks are ranked by: ``R_b`` or ``R_b / (1 + lambda f_b)`` (``joint``)."""
    if selection == "freeze_then_topk":
        return score
    if selection == "joint":
        return score / (1.0 + joint_lambda * frequency.to(score.dtype))
    raise ValueError(f"unknown selection {selection!r}: use one of {list(SELECTIONS)}")


def select_blocks(score: torch.Tensor, candidates: torch.Tensor, frozen: torch.Tensor, frequency: torch.Tensor,
                  budget: int, selection: str = "freeze_then_topk", joint_lambda: float = 1.0, *,
                  _force_sort: bool = False) -> torch.Tensor:
    """``[B]`` bool: the at most ``budget`` eligible blocks with the largest key (see the module docstring).

    Eligible: a candidate with finite ``R_b > 0``, and not frozen under ``freeze_then_topk``.
    """
    eligible = candidates & torch.isfinite(score) & (score > 0)
    if selection == "freeze_then_topk":
        eligible = eligible & ~frozen
    key = selection_key(score, frequency, selection, joint_lambda)
    key = torch.where(eligible, key, torch.full_like(key, -float("inf")))
    selected = torch.zeros_like(eligible)
    if budget <= 0:
        return selected
    if budget >= key.numel() or _force_sort:
        order = torch.sort(key, descending=True, stable=True).indices[:budget]
        selected[order] = eligible[order]  # no host sync: ineligible blocks in the top slots stay False
        return selected
    # The stable sort's first ``budget`` without sorting: every key above the budget-th largest, then the
    # keys equal to it in index order until the budget is used (O(B) instead of O(B log B)).
    kth = torch.kthvalue(key, key.numel() - budget + 1).values
    above = key > kth
    ties = key == kth
    room = budget - above.sum()
    chosen = above | (ties & (torch.cumsum(ties, 0) <= room))
    return chosen & eligible


def _log2(x: int) -> int:
    return max(1, math.ceil(math.log2(x))) if x > 1 else 0


def adaptation_elementwise_ops(num_candidates: int, groups_per_block: int, m: int, n: int, swaps_per_block: int,
                               lma: str, selection: str, num_changed: int, num_updated: int,
                               layer_numel: int = 0) -> int:
    """Element-wise work of one layer's scoring + selection on one adaptation step (an operation count).

    Counted on the candidate blocks only (what an implementation that gathers them does), with
    ``E = groups_per_block * m`` weights per block and ``P = min(n, m - n)`` pairs per group (1 for
    single swaps):

    - per-weight values ``a``, ``b``: 1 op/weight (``g*w``) for ``taylor``, 4 for ``gradient``
      (``g*w``, ``|.|``, ``|g|``, ``*s``), and the layer scale ``s`` 2 ops per weight of the layer
      (``layer_numel``);
    - splitting each group into kept/pruned and ordering them: ``m`` comparisons per group for a single
      swap (one max, one min), ``m * ceil(log2 m)`` for a sort;
    - pair scores: ``P`` subtractions per group; the block's best ``k``: ``G*P`` comparisons for ``k = 1``,
      ``G*P * ceil(log2(G*P))`` otherwise, plus ``k`` additions;
    - selection: eligibility (2) and, for ``joint``, the key (3) per candidate; a sort of the candidates,
      ``C * ceil(log2 C)`` comparisons;
    - OBF: ``2E`` comparisons per changed block (changed? back to the previous state?), 3 ops per EMA
      update, 2 per freeze test.
    """
    c = int(num_candidates)
    if c <= 0:
        return 0
    e = groups_per_block * m
    pairs = pairs_per_group(n, m, swaps_per_block)
    k = min(swaps_per_block, groups_per_block * pairs)
    per_weight = 1 if lma == "taylor" else 4
    scale = 0 if lma == "taylor" else 2 * int(layer_numel)
    order_per_group = m if pairs == 1 and k == 1 else m * _log2(m)
    best_k = top_k_elementwise_ops(groups_per_block * pairs, k)
    per_block = e * per_weight + groups_per_block * (order_per_group + pairs) + best_k
    select = selection_elementwise_ops(c, selection)
    return int(c * per_block + scale + select + obf_elementwise_ops(num_changed, num_updated, e))


def top_k_elementwise_ops(count: int, k: int) -> int:
    """A block's ``k`` best of ``count`` scores: ``count`` comparisons for ``k = 1``, else a sort
    (``count * ceil(log2 count)``) and ``k`` additions for the block score."""
    return count if k == 1 else count * _log2(count) + k


def selection_elementwise_ops(num_candidates: int, selection: str) -> int:
    """Selection among ``C`` candidate blocks: eligibility (2 ops) and, for ``joint``, the key (3) per
    candidate, and a sort of the candidates (``C * ceil(log2 C)`` comparisons)."""
    c = int(num_candidates)
    return c * (2 + (3 if selection == "joint" else 0)) + c * _log2(c)


def magnitude_elementwise_ops(num_blocks: int, groups_per_block: int, m: int) -> int:
    """Element-wise work of re-choosing ``num_blocks`` blocks by magnitude: ``|w|`` (1 op per weight) and a
    sort of every group (``m * ceil(log2 m)`` comparisons). OBF's share: :func:`obf_elementwise_ops`."""
    return int(num_blocks) * groups_per_block * m * (1 + _log2(m))


def obf_elementwise_ops(num_changed: int, num_updated: int, block_numel: int) -> int:
    """OBF's work on one adaptation step: ``2E`` comparisons per changed block (changed? back to the
    previous state?), 3 ops per EMA update and 2 per freeze test."""
    return int(num_changed) * 2 * block_numel + int(num_updated) * (3 + 2)
