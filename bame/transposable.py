"""Transposable N:M masks: N:M along K *and* along Cout, so that ``(W*m)^T`` is N:M too.

Tiles
-----
A weight is viewed as in :mod:`bame.nm`: ``W[Cout, K]`` (PyTorch's native order), grouped ``[Cout, G, m]``
in the chosen layout. A **tile** is ``m`` consecutive output rows times one group of ``m``: an ``m x m``
matrix ``tile[r, c]`` with ``r`` the row inside the tile (output channel ``m * i + r``) and ``c`` the
position inside the group. Tiles are numbered row-major over the ``(Cout / m) x G`` grid; in
:mod:`bame.nm`'s terms they are the blocks of ``block_rows = m``, ``block_groups = 1``. A mask is
**transposable N:M** when every tile keeps at most ``n`` in each row (N:M along K, the forward's
reduction axis) and at most ``n`` in each column (N:M along Cout, the input gradient's reduction axis,
what :meth:`bame.flops.FlopsLedger._flag` checks). The masks built here keep exactly ``n`` in each.
``Cout`` must be a multiple of ``m`` (a ``ValueError`` names the shape and the pattern otherwise); K must
be groupable as for any N:M mask. For a grouped conv, ``Cout / groups`` must be a multiple of ``m``
(:func:`check_transposable`), so that no tile straddles two convolution groups.

The mask that keeps the most magnitude
--------------------------------------
:func:`transposable_mask` maximises ``sum |W| * mask`` tile by tile, exactly, with one of two searches:

- ``enumerate`` (the default for ``m <= 4``): every ``m x m`` 0/1 matrix with ``n`` per row and per
  column (90 for 2:4, 24 for 1:4) is scored against every tile in one matrix product, and each tile takes
  the best (ties: the first in :func:`transposable_patterns`' order). NVIDIA ASP's ``m4n2_2d_best``
  does the same search.
- ``flow`` (the default above ``m = 4``, where the patterns are too many: 1:16 has 16! of them): the tile
  is a bipartite graph, rows on one side and columns on the other, and the mask is a maximum-weight
  subgraph in which every node has degree ``n`` (a b-matching). It is solved exactly as a min-cost flow
  by successive shortest paths: ``n * m`` augmentations, each a Bellman-Ford search (``<= 2m`` rounds)
  run on all tiles at once, ``O(n m^4)`` element operations per tile. ASP's ``m4n2_2d_greedy`` instead
  takes entries by decreasing magnitude while their row and column have room; it can stall short of
  ``n`` per row and is not optimal, which is why a greedy is not used here.

Both are exact, so their results keep the same magnitude (tests compare them with each other and with a
brute force); among equal optima they may choose different masks, each deterministically.

Changing a transposable mask: the rectangle exchange
----------------------------------------------------
BAME's swap (drop one kept weight, grow one pruned weight of the same group) changes two column counts,
so it breaks the constraint along Cout. Any change that keeps every row and column count of a tile is a
set of alternating cycles (kept, pruned, kept, ...) in the tile's bipartite graph, and the shortest cycle
has four edges. The smallest allowed change is therefore the **rectangle exchange** on rows ``r1 != r2``
and columns ``c1 != c2`` with ``(r1, c1)``, ``(r2, c2)`` kept and ``(r1, c2)``, ``(r2, c1)`` pruned: drop
the first two, grow the other two. It is two of BAME's swaps at once, one in row ``r1`` (drop ``c1``, grow
``c2``) and one in row ``r2`` (drop ``c2``, grow ``c1``), so its first-order score is the sum of theirs
with :func:`bame.bame_core.swap_values`' ``(a, b)``:

    R = a[r1, c1] - b[r1, c2] + a[r2, c2] - b[r2, c1]

(``taylor``: ``a = b = g * w``, the first-order loss reduction; ``gradient``: ``a = -|g w|``,
``b = -s |g|``). A tile with ``1 <= n < m`` always has one: the ``n`` rows of column ``c2`` cannot all lie
among the ``n - 1`` rows other than ``r1`` of column ``c1``. :func:`best_exchanges` finds each tile's best
exchange in ``O(m^3)`` per tile: ``R`` splits into a row-``r1`` term depending on ``(c1, c2)`` and a
row-``r2`` term depending on ``(c2, c1)``, and the validity conditions already force ``r1 != r2``, so each
term is maximised over the rows on its own.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from .bame_core import (BlockSwaps, Scalar, obf_elementwise_ops, selection_elementwise_ops, swap_values,
                        top_k_elementwise_ops)
from .nm import Layout, NMPattern, block_grid, from_blocks, to_blocks

__all__ = ["ALGORITHMS", "check_transposable", "to_tiles", "from_tiles", "transposable_patterns",
           "search_tiles", "transposable_tiles", "transposable_mask", "is_transposable_nm", "TileExchanges",
           "best_exchanges", "exchange_elementwise_ops", "check_block_shape", "blocks_to_tiles", "tiles_to_blocks",
           "block_exchanges", "transposable_blocks", "block_exchange_elementwise_ops"]

ALGORITHMS = ("auto", "enumerate", "flow")
ENUMERATE_MAX_M = 4  # 'auto' enumerates up to here: 2:4 has 90 patterns, 2:6 already 67,950
_CHUNK_TILES = 1 << 16  # tiles scored at once by 'enumerate': [chunk, patterns] floats
_FLOW_TOL = 1e-9  # relaxation slack on tiles scaled to max |score| = 1, so rounding never makes a cycle


def check_transposable(shape: torch.Size | tuple[int, ...], n: int, m: int, layout: Layout | str = Layout.ROW,
                       conv_groups: int = 1) -> None:
    """Raise ``ValueError`` naming the shape and the pattern unless a weight of ``shape`` tiles into ``m x m``
    tiles: ``Cout / conv_groups`` a multiple of ``m`` and K groupable by ``m`` in ``layout``."""
    NMPattern(n, m)
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"weight of shape {shape} cannot be transposable N:M {n}:{m}: need [Cout, ...]")
    rows = shape[0] // conv_groups if conv_groups >= 1 and shape[0] % conv_groups == 0 else None
    if rows is None or rows % m:
        per = "Cout" if conv_groups == 1 else f"Cout/groups (groups={conv_groups})"
        raise ValueError(f"weight of shape {shape} cannot be transposable N:M {n}:{m}: {per}="
                         f"{shape[0] if conv_groups == 1 else rows} is not a multiple of M={m}; "
                         f"use mask_structure 'row' for this layer, or keep it dense")
    block_grid(shape, m, block_rows=m, block_groups=1, layout=layout, n=n)  # K: raises naming shape/pattern


def to_tiles(t: torch.Tensor, m: int, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """``t[Cout, ...]`` -> ``[T, m, m]`` tiles (``T = Cout / m * G``), ``[tile, row, position in group]``."""
    return to_blocks(t, block_grid(t.shape, m, block_rows=m, block_groups=1, layout=layout), layout)


def from_tiles(tiles: torch.Tensor, shape: torch.Size | tuple[int, ...], layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: ``[T, m, m]`` back to ``shape``."""
    m = tiles.shape[-1]
    return from_blocks(tiles, block_grid(shape, m, block_rows=m, block_groups=1, layout=layout), shape, layout)


@functools.cache
def _patterns_cpu(n: int, m: int) -> torch.Tensor:
    rows = list(itertools.combinations(range(m), n))  # lexicographic
    found: list[tuple[tuple[int, ...], ...]] = []

    def extend(prefix: list, col_counts: list) -> None:
        if len(prefix) == m:
            found.append(tuple(prefix))
            return
        for combo in rows:
            if all(col_counts[c] < n for c in combo):
                for c in combo:
                    col_counts[c] += 1
                extend(prefix + [combo], col_counts)
                for c in combo:
                    col_counts[c] -= 1

    extend([], [0] * m)
    out = torch.zeros(len(found), m, m, dtype=torch.bool)
    for p, combos in enumerate(found):
        for r, combo in enumerate(combos):
            out[p, r, list(combo)] = True
    return out


def transposable_patterns(n: int, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[P, m, m]`` bool: every ``m x m`` 0/1 matrix with exactly ``n`` per row and per column (90 for
    2:4), ordered by their rows' combinations, lexicographically (row 0's first). ``m <= 6`` only."""
    NMPattern(n, m)
    if m > 6:
        raise ValueError(f"transposable_patterns({n}, {m}): too many patterns to list above M=6; "
                         f"use transposable_tiles(..., algorithm='flow')")
    return _patterns_cpu(n, m).to(device, copy=True)  # a copy: the cached tensor stays intact


def _enumerate_tiles(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Exact search over every pattern. ``scores`` ``[T, m, m]`` -> bool ``[T, m, m]``."""
    t, m, _ = scores.shape
    pats = transposable_patterns(n, m, scores.device)  # [P, m, m]
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32  # half: no CPU matmul
    flat = pats.reshape(len(pats), m * m).to(dtype)  # [P, m*m]
    best = torch.empty(t, dtype=torch.long, device=scores.device)
    for start in range(0, t, _CHUNK_TILES):
        chunk = scores[start:start + _CHUNK_TILES].reshape(-1, m * m).to(dtype)
        best[start:start + _CHUNK_TILES] = (chunk @ flat.T).argmax(dim=1)  # first of equal optima
    return pats[best]


def _flow_tiles(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Exact max-weight degree-``n`` subgraph of every tile by successive shortest paths (module docstring).

    ``scores`` ``[T, m, m]`` -> bool ``[T, m, m]`` and the Bellman-Ford rounds run (summed over the
    augmentations, each round on every tile at once). Node ``r`` (a row) sends flow to node ``c`` (a column)
    through a kept entry. Residual edges: ``r -> c`` for a pruned entry at cost ``-s`` (keeping it gains
    ``s``), ``c -> r`` for a kept entry at cost ``+s`` (pruning it). Sources: rows with fewer than ``n``;
    sinks: columns with fewer than ``n``.
    """
    t, m, _ = scores.shape
    s = scores.to(torch.float64)
    s = s / s.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-300)  # positive scaling keeps the optimum
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    keep = torch.zeros(t, m, m, dtype=torch.bool, device=s.device)
    tiles = torch.arange(t, device=s.device)
    rounds = 0
    for _ in range(n * m):  # every augmentation adds one kept entry to every tile
        add_cost = torch.where(keep, inf, -s)  # [T, r, c]: edge r -> c
        drop_cost = torch.where(keep, s, inf)  # [T, r, c]: edge c -> r
        d_row = torch.where(keep.sum(2) < n, 0.0, inf)  # [T, m]
        d_col = torch.full((t, m), float("inf"), dtype=s.dtype, device=s.device)
        pred_col = torch.zeros(t, m, dtype=torch.long, device=s.device)  # row that reached column c
        pred_row = torch.full((t, m), -1, dtype=torch.long, device=s.device)  # column that reached row r; -1: source
        for _ in range(2 * m):  # a shortest path visits each of the 2m nodes at most once
            rounds += 1
            via_r, arg_r = (d_row[:, :, None] + add_cost).min(dim=1)  # [T, c]
            better_c = via_r < d_col - _FLOW_TOL
            d_col = torch.where(better_c, via_r, d_col)
            pred_col = torch.where(better_c, arg_r, pred_col)
            via_c, arg_c = (d_col[:, None, :] + drop_cost).min(dim=2)  # [T, r]
            better_r = via_c < d_row - _FLOW_TOL
            d_row = torch.where(better_r, via_c, d_row)
            pred_row = torch.where(better_r, arg_c, pred_row)
            if not bool(better_c.any() | better_r.any()):
                break
        col = torch.where(keep.sum(1) < n, d_col, inf).argmin(dim=1)  # [T]: the cheapest sink
        walking = torch.ones(t, dtype=torch.bool, device=s.device)
        for _ in range(m):  # walk the path back: grow (r, col), then drop (r, previous col), ...
            if not bool(walking.any()):
                break
            row = pred_col[tiles, col]
            keep[tiles, row, col] |= walking
            prev = pred_row[tiles, row]
            at_source = prev < 0
            drop = walking & ~at_source
            keep[tiles, row, prev.clamp(min=0)] &= ~drop
            walking = drop
            col = torch.where(at_source, col, prev)
    if not bool(((keep.sum(1) == n) & (keep.sum(2) == n)).all()):
        raise RuntimeError(f"transposable flow search did not reach {n} per row and column (non-finite scores?)")
    return keep, rounds


def search_tiles(scores: torch.Tensor, n: int, algorithm: str = "auto") -> tuple[torch.Tensor, int]:
    """:func:`transposable_tiles` and its element-wise work (an operation count, for the FLOPs ledger).

    Per tile: ``enumerate`` ``P m^2`` multiply-adds (scoring every pattern) and ``P`` comparisons (the
    best); ``flow`` ``3 m^2`` (scaling), per augmentation ``2 m^2`` (the residual costs) and ``m`` (the
    path), and per Bellman-Ford round it ran ``4 m^2 + 4 m`` (two relaxations: additions, minima, updates).
    """
    if scores.dim() != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(f"transposable_tiles takes tiles [T, m, m], got shape {tuple(scores.shape)}")
    m = scores.shape[-1]
    NMPattern(n, m)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown transposable search {algorithm!r}: use one of {list(ALGORITHMS)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("transposable_tiles: scores must be finite (got inf or nan)")
    scores = scores.detach()
    t = scores.shape[0]
    if n == m or t == 0:
        return torch.full(scores.shape, n == m, dtype=torch.bool, device=scores.device), 0
    if algorithm == "auto":
        algorithm = "enumerate" if m <= ENUMERATE_MAX_M else "flow"
    if algorithm == "enumerate":
        keep = _enumerate_tiles(scores, n)  # refuses m > 6 before the patterns are listed
        p = len(_patterns_cpu(n, m))
        return keep, t * (p * m * m + p)
    keep, rounds = _flow_tiles(scores, n)
    return keep, t * (3 * m * m + n * m * (2 * m * m + m) + rounds * (4 * m * m + 4 * m))


def transposable_tiles(scores: torch.Tensor, n: int, algorithm: str = "auto") -> torch.Tensor:
    """Per tile, the mask with exactly ``n`` per row and per column that maximises ``sum scores * mask``.

    ``scores``: ``[T, m, m]`` (e.g. ``|W|`` from :func:`to_tiles`); returns bool ``[T, m, m]``.
    ``algorithm``: ``enumerate``, ``flow`` or ``auto`` (``enumerate`` for ``m <= 4``); see the module
    docstring. Raises ``ValueError`` for non-finite scores.
    """
    return search_tiles(scores, n, algorithm)[0]


def transposable_mask(scores: torch.Tensor, n: int, m: int, layout: Layout | str = Layout.ROW,
                      algorithm: str = "auto") -> torch.Tensor:
    """Bool mask of ``scores``' shape, transposable N:M, keeping the most ``sum scores * mask`` per tile.

    ``scores``: ``[Cout, ...]``, usually ``|W|``. Raises ``ValueError`` naming shape and pattern when
    ``Cout`` or K is not a multiple of ``m`` (:func:`check_transposable`).
    """
    check_transposable(scores.shape, n, m, layout)
    tiles = transposable_tiles(to_tiles(scores.detach(), m, layout), n, algorithm)
    return from_tiles(tiles, scores.shape, layout)


def is_transposable_nm(mask: torch.Tensor, n: int, m: int, layout: Layout | str = Layout.ROW,
                       exact: bool = False) -> bool:
    """True when every tile keeps at most ``n`` (exactly ``n`` with ``exact``) in each row and column.

    Raises ``ValueError`` like :func:`transposable_mask` when the shape does not tile.
    """
    check_transposable(mask.shape, n, m, layout)
    tiles = to_tiles(mask != 0, m, layout)
    rows, cols = tiles.sum(2), tiles.sum(1)  # [T, m] each
    if exact:
        return bool(((rows == n) & (cols == n)).all())
    return bool(((rows <= n) & (cols <= n)).all())


@dataclass(frozen=True)
class TileExchanges:
    """Each tile's best rectangle exchange (module docstring); whether a tile takes it is decided elsewhere."""

    score: torch.Tensor  # [T] R (-inf where the tile has none with a finite score)
    drop: torch.Tensor  # [T, m, m] bool: (r1, c1) and (r2, c2); all False where score is -inf
    grow: torch.Tensor  # [T, m, m] bool: (r1, c2) and (r2, c1)
    rows: torch.Tensor  # [T, 2] int64: (r1, r2)
    cols: torch.Tensor  # [T, 2] int64: (c1, c2), c1 < c2


def best_exchanges(w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, lma: str = "taylor",
                   grow_scale: Optional[Scalar] = None) -> TileExchanges:
    """The best rectangle exchange of every tile by its LMA score ``R`` (module docstring).

    ``w``, ``g``, ``mask``: ``[T, m, m]`` tiles (:func:`to_tiles`) of the weight, its gradient
    ``dL/d(W*m)`` and a transposable mask. Ties go to the lowest ``(c1, c2)`` with ``c1 < c2``, then the
    lowest ``r1``, then the lowest ``r2``, as a scan in that order keeping the first best would.
    Apply a plan with :func:`bame.bame_core.apply_swaps`.
    """
    if w.dim() != 3 or w.shape[1] != w.shape[2] or w.shape != g.shape or w.shape != mask.shape:
        raise ValueError(f"tiles must share one shape [T, m, m]: w {tuple(w.shape)}, g {tuple(g.shape)}, "
                         f"mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    t, m, _ = w.shape
    a, b = swap_values(w, g, lma, grow_scale)  # [T, r, c]
    inf = torch.tensor(float("inf"), dtype=a.dtype, device=a.device)
    # half[t, r, c1, c2] = a[r, c1] - b[r, c2]: row r drops c1 and grows c2 (c1 kept, c2 pruned)
    valid = mask[:, :, :, None] & ~mask[:, :, None, :]
    half = torch.where(valid, a[:, :, :, None] - b[:, :, None, :], -inf)
    half = torch.where(torch.isnan(half), -inf, half)
    best_half, best_row = half.max(dim=1)  # [T, c1, c2]: first best row
    r = best_half + best_half.transpose(1, 2)  # [T, c1, c2]: row r1 on (c1, c2) plus row r2 on (c2, c1)
    upper = torch.ones(m, m, dtype=torch.bool, device=w.device).triu(1)
    r = torch.where(upper & torch.isfinite(r), r, -inf).reshape(t, m * m)
    score, pair = r.max(dim=1)  # [T]: first best (c1, c2)
    c1, c2 = pair // m, pair % m
    tiles = torch.arange(t, device=w.device)
    r1, r2 = best_row[tiles, c1, c2], best_row[tiles, c2, c1]
    ok = torch.isfinite(score)
    drop = torch.zeros(t, m, m, dtype=torch.bool, device=w.device)
    grow = torch.zeros_like(drop)
    drop[tiles, r1, c1] = ok
    drop[tiles, r2, c2] = ok
    grow[tiles, r1, c2] = ok
    grow[tiles, r2, c1] = ok
    return TileExchanges(score, drop, grow, torch.stack([r1, r2], 1), torch.stack([c1, c2], 1))


def exchange_elementwise_ops(num_tiles: int, m: int, lma: str = "taylor", layer_numel: int = 0) -> int:
    """Element-wise work of :func:`best_exchanges` on ``num_tiles`` tiles (an operation count).

    Per tile: the values ``a``, ``b`` (1 op per weight for ``taylor``, 4 for ``gradient``, as
    :func:`bame.bame_core.adaptation_elementwise_ops`), ``m^3`` differences ``a[r, c1] - b[r, c2]``, ``m^3``
    comparisons for the best row of each ``(c1, c2)``, ``m^2`` additions of the two halves and ``m^2``
    comparisons for the best pair; ``gradient``'s scale ``s`` adds 2 ops per weight of the layer.
    """
    per_weight = 1 if lma == "taylor" else 4
    scale = 0 if lma == "taylor" else 2 * int(layer_numel)
    return int(num_tiles) * (per_weight * m * m + 2 * m ** 3 + 2 * m * m) + scale


# -- BAME's blocks made of whole tiles --------------------------------------------------------------------
# A block of ``block_rows x block_groups`` groups (bame.nm) holds whole tiles when ``block_rows`` is a multiple
# of m: ``q = block_rows / m`` tiles down times ``block_groups`` across. In block form ``[B, G, m]`` a block's
# groups run row-major (group ``r * block_groups + c``: row ``r``, group column ``c``), so its tile ``(i, c)``
# is rows ``i*m .. i*m + m - 1`` of column ``c``; tiles are numbered ``i * block_groups + c`` in their block.


def check_block_shape(block_rows: int, m: int) -> None:
    """``ValueError`` unless a block of ``block_rows`` rows is made of whole ``m x m`` tiles."""
    if block_rows < 1 or block_rows % m:
        raise ValueError(f"block_rows={block_rows} is not a multiple of M={m}: under mask_structure "
                         f"'transposable' a block is made of whole {m}x{m} tiles (block_rows = {m}, {2 * m}, ...; "
                         f"any block_groups)")


def blocks_to_tiles(blocks: torch.Tensor, block_rows: int, block_groups: int) -> torch.Tensor:
    """``[B, block_rows * block_groups, m]`` block form -> ``[B * tiles_per_block, m, m]`` tiles, block by block."""
    nb, _, m = blocks.shape
    check_block_shape(block_rows, m)
    q = block_rows // m
    t = blocks.reshape(nb, q, m, block_groups, m).permute(0, 1, 3, 2, 4)  # [B, q, bg, row, position]
    return t.reshape(nb * q * block_groups, m, m)


def tiles_to_blocks(tiles: torch.Tensor, block_rows: int, block_groups: int) -> torch.Tensor:
    """Inverse of :func:`blocks_to_tiles`."""
    m = tiles.shape[-1]
    q = block_rows // m
    b = tiles.reshape(-1, q, block_groups, m, m).permute(0, 1, 3, 2, 4)  # [B, q, row, bg, position]
    return b.reshape(-1, block_rows * block_groups, m)


def block_exchanges(w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, block_rows: int, block_groups: int,
                    lma: str = "taylor", swaps_per_block: int = 1, grow_scale: Optional[Scalar] = None) -> BlockSwaps:
    """Each block's plan of rectangle exchanges, as :func:`bame.bame_core.block_swaps` plans swaps.

    ``w``, ``g``, ``mask``: ``[B, G, m]`` block form of blocks of whole tiles, the mask transposable. Every
    tile's best exchange (:func:`best_exchanges`); a block takes its best tile's exchange, and with
    ``swaps_per_block = k > 1`` up to ``k`` tiles' (one exchange per tile: distinct tiles never conflict),
    the best always, the others where their ``R > 0`` (ties: the lower tile). ``R_b = R_(1) + sum_{r>=2}
    max(R_(r), 0)``. ``num_swaps`` counts the swaps the plan makes: two per exchange. Apply the plan with
    :func:`bame.bame_core.apply_swaps`; row and column counts of every tile stay as they were.
    """
    nb = w.shape[0]
    ex = best_exchanges(*(blocks_to_tiles(t, block_rows, block_groups) for t in (w, g, mask)), lma, grow_scale)
    per_block = ex.score.reshape(nb, -1)  # [B, tiles per block]
    k = min(int(swaps_per_block), per_block.shape[1])
    if k < 1:
        raise ValueError(f"swaps_per_block must be >= 1, got {swaps_per_block}")
    if k == 1:
        top, idx = per_block.max(dim=1, keepdim=True)  # the first best tile
    else:
        top, idx = torch.sort(per_block, dim=1, descending=True, stable=True)
        top, idx = top[:, :k], idx[:, :k]
    take = top > 0
    take[:, 0] = True  # the best exchange is always the plan's first
    chosen = torch.zeros_like(per_block, dtype=torch.bool).scatter_(1, idx, take)  # [B, tiles per block]
    chosen_tiles = chosen.reshape(-1, 1, 1)
    drop = tiles_to_blocks(ex.drop & chosen_tiles, block_rows, block_groups)
    grow = tiles_to_blocks(ex.grow & chosen_tiles, block_rows, block_groups)
    score = top[:, 0] + top[:, 1:].clamp(min=0).sum(dim=1)
    return BlockSwaps(score, drop, grow, 2 * (chosen & torch.isfinite(per_block)).sum(dim=1), top)


def transposable_blocks(w: torch.Tensor, n: int, block_rows: int, block_groups: int,
                        algorithm: str = "auto") -> tuple[torch.Tensor, int]:
    """``[B, G, m]`` bool: in every tile of every block, the transposable mask keeping the most ``|w|`` (BAME's
    magnitude re-choice of a block, tile by tile), and the search's element-wise work (:func:`search_tiles`,
    plus ``m^2`` per tile for ``|w|``)."""
    tiles = blocks_to_tiles(w.detach().abs(), block_rows, block_groups)
    keep, ops = search_tiles(tiles, n, algorithm)
    m = w.shape[-1]
    return tiles_to_blocks(keep, block_rows, block_groups), ops + tiles.shape[0] * m * m


def block_exchange_elementwise_ops(num_candidates: int, tiles_per_block: int, m: int, swaps_per_block: int,
                                   lma: str, selection: str, num_changed: int, num_updated: int,
                                   layer_numel: int = 0) -> int:
    """Element-wise work of one layer's scoring + selection on one adaptation step of transposable BAME: the
    exchanges of every tile of the candidate blocks (:func:`exchange_elementwise_ops`), each block's best
    ``k`` tiles (``bame_core.top_k_elementwise_ops``), the selection and OBF, as
    :func:`bame.bame_core.adaptation_elementwise_ops` counts them."""
    c = int(num_candidates)
    if c <= 0:
        return 0
    k = min(swaps_per_block, tiles_per_block)
    return int(exchange_elementwise_ops(c * tiles_per_block, m, lma, layer_numel)
               + c * top_k_elementwise_ops(tiles_per_block, k) + selection_elementwise_ops(c, selection)
               + obf_elementwise_ops(num_changed, num_updated, tiles_per_block * m * m))
