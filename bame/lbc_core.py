"""LBC's learnable N:M combinations (Zhang et al., NeurIPS 2022), as pure functions.

Each group of ``m`` weights (a group of :func:`bame.nm.group_view`, flattened to ``[G, m]`` in the
layer's layout) has one learnable score for every one of its ``C = C(m, n)`` candidate masks, the
combinations of ``n`` positions (:func:`combination_table`, in ``itertools.combinations`` order), and an
``alive`` flag for each. Shapes: scores and alive ``[G, C]``, the table ``[C, m]``.

- **Mask** (:func:`group_mask`): a position is kept iff at least one alive combination covers it, the
  union. All alive at the start, so training starts dense; a position is pruned once every combination
  containing it is cut, and the mask is exactly N:M when one combination is left per group. Their code
  tests ``(scores * [scores != 0]) @ table != 0``; with an explicit ``alive`` the union is the same except
  where alive scores happen to sum to exactly 0 at a position, which theirs would prune.
- **Score gradient** (:func:`score_grad`): straight through the binarisation, ``dL/dscore[g, c] =
  sum over positions j of c of G[g, j] * W[g, j]`` for alive ``c`` (0 for cut ones), with
  ``G = dL/d(W * mask)``. Every position of an alive combination is kept, so it needs ``G`` only where the
  mask is 1.
- **Schedule** (:func:`surviving_combinations`): between ``t_i`` and ``t_f`` (fractions of training) the
  number of combinations left per group falls as ``1 + ceil((C - 1) (1 - (t - t_i)/(t_f - t_i))^e)``,
  ``e = 3`` (their ResNet code; their DeiT code uses 4): ``C`` up to ``t_i``, 1 from ``t_f`` on. Their
  ResNet code evaluates it once per epoch with ``t`` an integer epoch and ``t_i``, ``t_f`` in epochs (0
  and 60 of 120 in their README); here ``t`` is a fraction of the training steps, evaluated at any step.
  Their schedule is ``t = floor(step / steps_per_epoch) / epochs`` with ``t_i = t_i_epochs / epochs`` and
  ``t_f = t_f_epochs / epochs``; with ``t = step / total_steps`` the same cuts come earlier, within the
  epoch they fall in.
- **Cutting** (:func:`cut_combinations`): before each step, each group keeps its ``survivors`` highest
  alive scores (signed); ties go to the lower combination index, so the later one is cut. A cut
  combination stays cut: theirs recognises a cut score by its being exactly 0, and the optimizer's
  momentum can move it off 0 and back into the ranking. Once one is left per group the scores are frozen.
- **Memory** (:func:`check_combinations`): the scores add ``C/m`` floats per weight, three times that with
  SGD (score, gradient, momentum), four with Adam: ``C/m`` is 1.5 at 2:4, 1 at 1:16, 3.5 at 2:8 and 8.75
  at 4:8. The default limit, :data:`MAX_COMBINATIONS` = 128, admits every pattern with ``m <= 8`` (the
  largest, 4:8, has 70) and 1:16 and 2:16 (16 and 120), and refuses 3:16 (560, 35x the weights per state)
  and beyond.
"""

from __future__ import annotations

import functools
import itertools
import math
import torch

from .nm import Layout, NMPattern, group_view, ungroup

__all__ = ["MAX_COMBINATIONS", "num_combinations", "check_combinations", "combination_table", "initial_scores",
           "group_mask", "layer_mask", "grouped", "score_grad", "surviving_combinations", "cut_combinations",
           "is_settled", "lbc_elementwise_ops"]

MAX_COMBINATIONS = 128


def num_combinations(n: int, m: int) -> int:
    """``C(m, n)``: the candidate masks of one group."""
    NMPattern(n, m)
    return math.comb(m, n)


def check_combinations(n: int, m: int, limit: int = MAX_COMBINATIONS) -> int:
    """``C(m, n)``, or ``ValueError`` naming the pattern, ``C(m, n)`` and the memory when it exceeds ``limit``."""
    c = num_combinations(n, m)
    if c > limit:
        raise ValueError(f"lbc with pattern {n}:{m} needs C({m},{n})={c} scores per group of {m}, above the limit "
                         f"of {limit}: the scores alone would take {c / m:g}x the weights' memory (3x that with "
                         f"SGD momentum and gradients); use a pattern with fewer combinations (e.g. 1:{m}) or "
                         f"raise the limit")
    return c


@functools.cache
def _table_cpu(n: int, m: int) -> torch.Tensor:
    table = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for i, combo in enumerate(itertools.combinations(range(m), n)):
        table[i, list(combo)] = True
    return table


def combination_table(n: int, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[C, m]`` bool: row ``c`` marks the positions of combination ``c``, in ``itertools.combinations``
    order (``(0, 1), (0, 2), ...`` for 2:4)."""
    num_combinations(n, m)
    return _table_cpu(n, m).to(device, copy=True)  # a copy: the cached table stays intact


def initial_scores(num_groups: int, n: int, m: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``[G, C]`` filled with ``1 / C(m-1, n-1)``, their initial value (every position's alive scores
    then sum to 1)."""
    c = num_combinations(n, m)
    return torch.full((num_groups, c), 1.0 / math.comb(m - 1, n - 1), dtype=dtype, device=device)


def group_mask(alive: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[G, m]`` bool: the positions covered by at least one alive combination. ``alive``: ``[G, C]``."""
    if alive.dim() != 2 or alive.shape[1] != table.shape[0]:
        raise ValueError(f"alive must be [G, C={table.shape[0]}], got {tuple(alive.shape)}")
    return (alive.to(torch.float32) @ table.to(alive.device, torch.float32)) > 0  # counts are small integers


def grouped(t: torch.Tensor, m: int, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """``t[Cout, ...]`` as ``[G, m]``: the groups of :func:`bame.nm.group_view`, row-major."""
    return group_view(t, m, layout).reshape(-1, m)


def layer_mask(alive: torch.Tensor, table: torch.Tensor, shape: torch.Size | tuple[int, ...],
               layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """The weight's bool mask of ``shape`` from :func:`group_mask` (groups numbered as :func:`grouped`)."""
    m = table.shape[1]
    cout = shape[0]
    return ungroup(group_mask(alive, table).reshape(cout, -1, m), shape, layout)


def score_grad(grad: torch.Tensor, weight: torch.Tensor, alive: torch.Tensor, table: torch.Tensor,
               layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """``[G, C]``: ``dL/dscore`` by the straight-through rule, ``sum_{j in c} grad[g, j] * weight[g, j]`` for
    alive ``c``, 0 for cut ones. ``grad`` is ``dL/d(W * mask)``, of ``weight``'s shape."""
    m = table.shape[1]
    gw = grouped(grad * weight, m, layout)  # [G, m]
    return (gw @ table.to(gw.device, gw.dtype).T) * alive.to(gw.dtype)  # [G, C]


def surviving_combinations(progress: float, total: int, t_i: float, t_f: float, exponent: float = 3.0) -> int:
    """How many of its ``total`` combinations each group keeps at ``progress`` (a fraction of training;
    module docstring)."""
    if not 0.0 <= t_i < t_f <= 1.0:
        raise ValueError(f"lbc schedule needs 0 <= t_i < t_f <= 1 (fractions of training), got t_i={t_i}, t_f={t_f}")
    if exponent <= 0:
        raise ValueError(f"lbc schedule exponent must be > 0, got {exponent}")
    if progress <= t_i:
        return total
    if progress >= t_f:
        return 1
    left = (1.0 - (progress - t_i) / (t_f - t_i)) ** exponent
    return 1 + math.ceil((total - 1) * left - 1e-9)  # 1e-9: an exact integer must not round up


def cut_combinations(scores: torch.Tensor, alive: torch.Tensor, survivors: int) -> torch.Tensor:
    """``[G, C]`` bool: ``alive`` less all but the ``survivors`` highest alive scores of each group.

    Ties go to the lower combination index (a stable sort); NaN scores rank below every number. Cut
    combinations never come back, so a group with fewer alive than ``survivors`` is left as it is.
    """
    if scores.shape != alive.shape or scores.dim() != 2:
        raise ValueError(f"scores and alive must share one shape [G, C]: {tuple(scores.shape)}, {tuple(alive.shape)}")
    if survivors < 1:
        raise ValueError(f"survivors must be >= 1, got {survivors}")
    if survivors >= scores.shape[1]:
        return alive.clone()
    low = torch.finfo(scores.dtype).min
    key = torch.where(torch.isnan(scores), low, scores.detach())
    key = torch.where(alive, key, -float("inf"))  # cut ones rank last
    top = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :survivors]
    return torch.zeros_like(alive).scatter_(1, top, True) & alive


def is_settled(alive: torch.Tensor) -> bool:
    """True when every group has exactly one alive combination: the mask is final and N:M."""
    return bool((alive.sum(1) == 1).all())


def lbc_elementwise_ops(num_groups: int, n: int, m: int, num_alive: int, nnz_mask: int, cutting: bool,
                        scoring: bool = True) -> int:
    """Element-wise work of one LBC step of a layer beyond its conv/linear (an operation count).

    - scoring (``scoring``: a step that computes the score gradient): ``grad * weight`` at the kept positions
      (``nnz_mask``) and ``n`` additions per alive combination (``num_alive``, summed over groups);
    - cutting (``cutting``: a step that cuts combinations): a sort of each group's ``C`` scores, ``G * C *
      ceil(log2 C)`` comparisons, and the mask rebuilt from the ``num_alive`` combinations left, ``n`` ORs each.
    """
    c = num_combinations(n, m)
    ops = int(nnz_mask) + n * int(num_alive) if scoring else 0
    if cutting and c > 1:
        ops += num_groups * c * max(1, math.ceil(math.log2(c))) + n * int(num_alive)
    return ops
