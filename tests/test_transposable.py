"""Transposable N:M masks and rectangle exchanges against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bame.bame_core import apply_swaps, gradient_grow_scale
from bame.nm import block_grid, from_blocks, is_nm, to_blocks
from bame.transposable import (block_exchange_elementwise_ops, block_exchanges, blocks_to_tiles, best_exchanges,
                               check_block_shape, check_transposable, exchange_elementwise_ops, from_tiles,
                               is_transposable_nm, search_tiles, tiles_to_blocks, to_tiles, transposable_blocks,
                               transposable_mask, transposable_patterns, transposable_tiles)


def _all_4x4(n: int) -> torch.Tensor:
    """Every 4x4 0/1 matrix with n per row and column, found among all 2^16 (independent of the module)."""
    bits = (torch.arange(1 << 16)[:, None] >> torch.arange(16)) & 1  # [65536, 16]
    mats = bits.reshape(-1, 4, 4)
    ok = (mats.sum(2) == n).all(1) & (mats.sum(1) == n).all(1)
    return mats[ok].bool()


def _dp_best(s: torch.Tensor, n: int) -> float:
    """Max of sum s*mask over m x m 0/1 matrices with n per row and column: a DP over rows whose state is
    the column counts so far (exhaustive, without listing the matrices)."""
    m = s.shape[0]
    best = {(0,) * m: 0.0}
    for r in range(m):
        nxt: dict = {}
        for state, val in best.items():
            for combo in itertools.combinations(range(m), n):
                if any(state[c] == n for c in combo):
                    continue
                new = list(state)
                for c in combo:
                    new[c] += 1
                v = val + sum(float(s[r, c]) for c in combo)
                key = tuple(new)
                if v > nxt.get(key, -math.inf):
                    nxt[key] = v
        best = nxt
    return best[(n,) * m]


def _dp_best_assignment(s: torch.Tensor) -> float:
    """Max weight permutation of an m x m matrix (n = 1) by a DP over subsets of used columns: row r
    extends every subset of r columns by one unused column."""
    m = s.shape[0]
    states = torch.arange(1 << m)
    popcount = sum((states >> c) & 1 for c in range(m))
    bits = 1 << torch.arange(m)  # [m]
    dp = torch.full((1 << m,), -math.inf, dtype=torch.float64)
    dp[0] = 0.0
    for r in range(m):
        src = states[popcount == r]  # [S]
        free = (src[:, None] & bits) == 0  # [S, m]
        dst = (src[:, None] | bits)[free]
        val = (dp[src][:, None] + s[r].to(torch.float64))[free]
        new = torch.full_like(dp, -math.inf)
        dp = new.scatter_reduce_(0, dst, val, reduce="amax")
    return float(dp[-1])


@pytest.mark.parametrize("n,m,count", [(2, 4, 90), (1, 4, 24), (3, 4, 24), (1, 5, 120), (2, 5, 2040)])
def test_patterns_are_every_doubly_n_matrix_once(n, m, count):
    pats = transposable_patterns(n, m)
    assert pats.shape == (count, m, m)
    assert (pats.sum(1) == n).all() and (pats.sum(2) == n).all()
    assert len({tuple(p.flatten().tolist()) for p in pats}) == count
    if m == 4:
        assert {tuple(p.flatten().tolist()) for p in pats} == {tuple(p.flatten().tolist()) for p in _all_4x4(n)}
    with pytest.raises(ValueError, match="above M=6"):
        transposable_patterns(1, 8)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ["enumerate", "flow"])
def test_4x4_tiles_take_the_brute_force_optimum(n, algorithm):
    gen = torch.Generator().manual_seed(n)
    s = torch.rand(200, 4, 4, generator=gen, dtype=torch.float64)
    got = transposable_tiles(s, n, algorithm)
    every = _all_4x4(n).to(s.dtype)  # [P, 4, 4]
    values = torch.einsum("tij,pij->tp", s, every)
    best = values.max(dim=1)
    assert torch.allclose((s * got).sum((1, 2)), best.values, atol=1e-12)
    # continuous scores: the optimum is unique, so the masks agree too
    assert torch.equal(got, every[best.indices].bool())


@pytest.mark.parametrize("n,m,tiles", [(2, 5, 12), (2, 6, 6), (3, 6, 3), (1, 8, 8), (2, 8, 1)])
def test_flow_reaches_the_brute_force_optimum_above_m4(n, m, tiles):
    gen = torch.Generator().manual_seed(10 * n + m)
    s = torch.randn(tiles, m, m, generator=gen, dtype=torch.float64)  # signed scores too
    got = transposable_tiles(s, n)
    assert (got.sum(1) == n).all() and (got.sum(2) == n).all()
    for t in range(tiles):
        assert float((s[t] * got[t]).sum()) == pytest.approx(_dp_best(s[t], n), abs=1e-9)


def test_flow_is_optimal_for_1_16_tiles():
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)
    got = transposable_tiles(s, 1)
    for t in range(2):
        assert float((s[t] * got[t]).sum()) == pytest.approx(_dp_best_assignment(s[t]), abs=1e-9)


def test_flow_and_enumeration_agree_on_ties():
    gen = torch.Generator().manual_seed(4)
    s = torch.randint(0, 3, (300, 4, 4), generator=gen).to(torch.float32)  # many equal optima
    for n in (1, 2, 3):
        a, b = transposable_tiles(s, n, "enumerate"), transposable_tiles(s, n, "flow")
        assert torch.equal((s * a).sum((1, 2)), (s * b).sum((1, 2)))
        for k in (a, b):
            assert (k.sum(1) == n).all() and (k.sum(2) == n).all()
    zeros = transposable_tiles(torch.zeros(2, 8, 8), 2)  # all ties, degenerate scale
    assert (zeros.sum(1) == 2).all() and (zeros.sum(2) == 2).all()


@pytest.mark.parametrize("shape,layout", [((8, 12), "row"), ((8, 4, 3, 3), "row"), ((8, 8, 3, 3), "channel"),
                                          ((4, 8, 1, 1), "row")])
def test_mask_tiles_rows_are_outputs_and_columns_consecutive_k(shape, layout):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = transposable_mask(w.abs(), 2, 4, layout)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert is_transposable_nm(mask, 2, 4, layout, exact=True)
    assert is_nm(mask, 2, 4, layout, exact=True)
    if layout == "row":  # brute force on the documented tiling of W[Cout, K]
        w2, m2 = w.abs().reshape(shape[0], -1), mask.reshape(shape[0], -1)
        every = _all_4x4(2)
        for i in range(0, shape[0], 4):
            for j in range(0, w2.shape[1], 4):
                tile = w2[i:i + 4, j:j + 4]
                best = max(float((tile * p).sum()) for p in every)
                assert float((tile * m2[i:i + 4, j:j + 4]).sum()) == pytest.approx(best, rel=1e-6)
                assert (m2[i:i + 4, j:j + 4].sum(0) == 2).all()  # N:M along Cout
    assert torch.equal(from_tiles(to_tiles(w, 4, layout), w.shape, layout), w)


def test_shapes_that_do_not_tile_are_refused_naming_shape_and_pattern():
    with pytest.raises(ValueError, match=r"\(6, 8\) cannot be transposable N:M 2:4: Cout=6 is not a multiple of M=4"):
        transposable_mask(torch.randn(6, 8), 2, 4)
    with pytest.raises(ValueError, match=r"\(8, 6\) cannot be N:M 2:4 .*K=6"):
        transposable_mask(torch.randn(8, 6), 2, 4)
    with pytest.raises(ValueError, match=r"Cout/groups \(groups=2\)=4 is not a multiple of M=8"):
        check_transposable((8, 8, 3, 3), 1, 8, conv_groups=2)
    check_transposable((16, 8, 3, 3), 1, 8, conv_groups=2)
    with pytest.raises(ValueError, match="Cout=6"):
        is_transposable_nm(torch.ones(6, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="finite"):
        transposable_tiles(torch.tensor([[[float("nan")] * 4] * 4]), 2)
    with pytest.raises(ValueError, match="unknown transposable search"):
        transposable_tiles(torch.rand(1, 4, 4), 2, "greedy")


def test_is_transposable_nm_sees_rows_and_columns():
    mask = transposable_mask(torch.rand(8, 8), 2, 4)
    assert is_transposable_nm(mask, 2, 4, exact=True)
    # N:M along K only: every row keeps 2 of 4, column 0 keeps 4 of 4
    rows_only = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert is_nm(rows_only, 2, 4) and not is_transposable_nm(rows_only, 2, 4)
    # N:M along Cout only: the transpose
    assert is_nm(rows_only.T.contiguous().T, 2, 4) and not is_transposable_nm(rows_only.T.contiguous(), 2, 4)
    fewer = mask.clone()
    fewer[0, :] = False
    assert is_transposable_nm(fewer, 2, 4) and not is_transposable_nm(fewer, 2, 4, exact=True)


def _brute_exchange(a, b, mask):
    """The first best (c1 < c2, r1, r2) in lexicographic order, and its score."""
    m = mask.shape[0]
    best, arg = -math.inf, None
    for c1, c2 in itertools.combinations(range(m), 2):
        for r1 in range(m):
            for r2 in range(m):
                if not (mask[r1, c1] and mask[r2, c2] and not mask[r1, c2] and not mask[r2, c1]):
                    continue
                score = float((a[r1, c1] - b[r1, c2]) + (a[r2, c2] - b[r2, c1]))
                if score > best:
                    best, arg = score, (r1, r2, c1, c2)
    return best, arg


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (1, 8)])
@pytest.mark.parametrize("lma", ["taylor", "gradient"])
def test_best_exchange_is_the_brute_force_best(n, m, lma):
    gen = torch.Generator().manual_seed(n + 7 * m)
    w = torch.randn(6, m, m, generator=gen, dtype=torch.float64)
    g = torch.randn(6, m, m, generator=gen, dtype=torch.float64)
    mask = transposable_tiles(torch.rand(6, m, m, generator=gen), n)
    scale = gradient_grow_scale(w, mask) if lma == "gradient" else None
    ex = best_exchanges(w, g, mask, lma, scale)
    for t in range(6):
        if lma == "taylor":
            a = b = g[t] * w[t]
        else:
            a, b = -(g[t] * w[t]).abs(), -(g[t].abs() * scale)
        best, (r1, r2, c1, c2) = _brute_exchange(a, b, mask[t])
        assert float(ex.score[t]) == best
        assert ex.rows[t].tolist() == [r1, r2] and ex.cols[t].tolist() == [c1, c2]
        drop = torch.zeros(m, m, dtype=torch.bool)
        drop[r1, c1] = drop[r2, c2] = True
        grow = torch.zeros(m, m, dtype=torch.bool)
        grow[r1, c2] = grow[r2, c1] = True
        assert torch.equal(ex.drop[t], drop) and torch.equal(ex.grow[t], grow)
    if lma == "taylor":  # the score is the first-order loss reduction of the change
        new = apply_swaps(mask, ex.drop, ex.grow)
        delta = ((g * w) * (mask.double() - new.double())).sum((1, 2))
        assert torch.allclose(delta, ex.score)


def test_exchange_ties_follow_the_documented_order():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)[None]
    ex = best_exchanges(torch.ones(1, 4, 4), torch.zeros(1, 4, 4), mask)  # every exchange scores 0
    _, (r1, r2, c1, c2) = _brute_exchange(torch.zeros(4, 4), torch.zeros(4, 4), mask[0])
    assert ex.rows[0].tolist() == [r1, r2] == [3, 1] and ex.cols[0].tolist() == [c1, c2] == [0, 1]
    assert float(ex.score[0]) == 0.0


def test_exchanges_keep_the_mask_transposable_over_many_steps():
    """Adaptation steps of BAME's kind, one exchange in the best tiles each time: the invariants hold."""
    gen = torch.Generator().manual_seed(5)
    for n, m in [(2, 4), (1, 8)]:
        w = torch.randn(16, 4 * m, generator=gen)
        mask = transposable_mask(w.abs(), n, m)
        for _ in range(10):
            g = torch.randn(w.shape, generator=gen)
            ex = best_exchanges(to_tiles(w, m), to_tiles(g, m), to_tiles(mask, m))
            assert torch.isfinite(ex.score).all()  # 1 <= n < m: every tile has one
            selected = ex.score >= ex.score.median()
            new = from_tiles(apply_swaps(to_tiles(mask, m), ex.drop, ex.grow, selected), w.shape)
            assert is_transposable_nm(new, n, m, exact=True)
            changed = (new != mask).reshape(-1).sum()
            assert int(changed) == 4 * int(selected.sum())
            mask = new


def test_no_exchange_where_scores_are_not_finite():
    mask = transposable_tiles(torch.rand(2, 4, 4), 2)
    g = torch.full((2, 4, 4), float("nan"))
    g[1] = 1.0
    ex = best_exchanges(torch.ones(2, 4, 4), g, mask)
    assert ex.score[0] == -math.inf and not ex.drop[0].any() and not ex.grow[0].any()
    assert torch.isfinite(ex.score[1]) and int(ex.drop[1].sum()) == 2


def test_exchange_ops_count():
    # 3 tiles of 4x4: 16 values + 64 differences + 64 comparisons + 16 additions + 16 comparisons each
    assert exchange_elementwise_ops(3, 4) == 3 * (16 + 64 + 64 + 16 + 16)
    assert exchange_elementwise_ops(3, 4, "gradient", layer_numel=100) == 3 * (64 + 64 + 64 + 16 + 16) + 200
    assert exchange_elementwise_ops(0, 16) == 0


# -- BAME's blocks of whole tiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows,block_groups", [(4, 1), (8, 1), (4, 3), (8, 2)])
def test_blocks_hold_the_tiles_of_the_weight(block_rows, block_groups):
    """A block's tiles are exactly the weight's tiles (to_tiles) that lie in the block, and back."""
    w = torch.arange(16 * 24, dtype=torch.float32).reshape(16, 24)  # 16 rows x 6 groups of 4
    grid = block_grid(w.shape, 4, block_rows, block_groups)
    tiles = blocks_to_tiles(to_blocks(w, grid), block_rows, block_groups)
    assert sorted(map(tuple, tiles.reshape(len(tiles), -1).tolist())) == \
        sorted(map(tuple, to_tiles(w, 4).reshape(-1, 16).tolist()))
    assert torch.equal(from_blocks(tiles_to_blocks(tiles, block_rows, block_groups), grid, w.shape), w)
    first = tiles[0]  # block 0, tile 0: rows 0..3 of group 0
    assert torch.equal(first, w[:4, :4])
    with pytest.raises(ValueError, match=r"block_rows=6 is not a multiple of M=4: .* whole 4x4 tiles"):
        check_block_shape(6, 4)


def _brute_block_plan(score: torch.Tensor, k: int) -> tuple[float, list[int]]:
    """The best total of at most k tiles' exchanges, the best one always taken, others only when > 0."""
    order = sorted(range(len(score)), key=lambda t: (-float(score[t]), t))
    taken = [order[0]] + [t for t in order[1:k] if float(score[t]) > 0]
    return float(score[order[0]]) + sum(max(float(score[t]), 0.0) for t in order[1:k]), taken


@pytest.mark.parametrize("n,m,k", [(2, 4, 1), (2, 4, 3), (1, 8, 2)])
def test_block_plan_takes_its_best_tiles_exchanges(n, m, k):
    gen = torch.Generator().manual_seed(3 * k + m)
    block_rows, block_groups = 2 * m, 2  # 4 tiles per block
    w = torch.randn(4 * m, 6 * m, generator=gen, dtype=torch.float64)
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    mask = transposable_mask(torch.rand(w.shape, generator=gen), n, m)
    grid = block_grid(w.shape, m, block_rows, block_groups)
    wb, gb, mb = (to_blocks(t, grid) for t in (w, g, mask))
    plan = block_exchanges(wb, gb, mb, block_rows, block_groups, "taylor", k)
    tile_scores = best_exchanges(*(blocks_to_tiles(t, block_rows, block_groups) for t in (wb, gb, mb))).score
    for b, per_tile in enumerate(tile_scores.reshape(grid.num_blocks, -1)):
        best, taken = _brute_block_plan(per_tile, k)
        assert float(plan.score[b]) == pytest.approx(best)
        changed_tiles = (blocks_to_tiles((plan.drop | plan.grow)[b:b + 1], block_rows, block_groups)
                         .reshape(len(per_tile), -1).any(1))
        assert changed_tiles.nonzero().flatten().tolist() == sorted(taken)
        assert int(plan.num_swaps[b]) == 2 * len(taken) == int(plan.drop[b].sum())
    new = from_blocks(apply_swaps(mb, plan.drop, plan.grow), grid, w.shape)
    assert is_transposable_nm(new, n, m, exact=True)
    delta = ((g * w) * (mask.double() - new.double())).sum()  # taylor: R_b is the plan's first-order gain
    assert float(delta) == pytest.approx(float(plan.score.sum()))


@pytest.mark.parametrize("n,m,algorithm", [(2, 4, "enumerate"), (1, 16, "flow")])
def test_magnitude_re_choice_of_blocks_is_the_search_per_tile(n, m, algorithm):
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(2 * m, 3 * m, generator=gen)
    grid = block_grid(w.shape, m, m, 3)  # blocks of 3 tiles
    got, ops = transposable_blocks(to_blocks(w, grid), n, m, 3, algorithm)
    assert torch.equal(from_blocks(got, grid, w.shape), transposable_mask(w.abs(), n, m, algorithm=algorithm))
    keep, search_ops = search_tiles(to_tiles(w.abs(), m), n, algorithm)
    assert ops == search_ops + 6 * m * m  # 6 tiles, |w| of each
    if algorithm == "enumerate":  # 90 patterns: 16 multiply-adds and one comparison each, per tile
        assert search_ops == 6 * (90 * 16 + 90)
    else:  # 3m^2 scaling, per augmentation 2m^2 + m, per round run 4m^2 + 4m; at least 1 round each
        fixed = 6 * (3 * m * m + n * m * (2 * m * m + m))
        assert search_ops > fixed and (search_ops - fixed) % (6 * (4 * m * m + 4 * m)) == 0


def test_block_exchange_ops_count():
    # 2 candidate blocks of 3 tiles 4x4 (taylor): the exchanges of 6 tiles, the best of 3 tiles per block,
    # selection (2 each + a sort of 2), OBF: one changed block (2 x 48 comparisons) and its EMA update (5)
    want = exchange_elementwise_ops(6, 4) + 2 * 3 + (2 * 2 + 2 * 1) + (2 * 48 + 5)
    assert block_exchange_elementwise_ops(2, 3, 4, 1, "taylor", "freeze_then_topk", 1, 1) == want
    assert block_exchange_elementwise_ops(0, 3, 4, 1, "taylor", "freeze_then_topk", 0, 0) == 0
