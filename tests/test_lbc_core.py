"""LBC's combinations, mask, score gradient, schedule and cuts against brute force and their formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bame.lbc_core import (MAX_COMBINATIONS, check_combinations, combination_table, cut_combinations, group_mask,
                           grouped, initial_scores, is_settled, layer_mask, lbc_elementwise_ops, score_grad,
                           surviving_combinations)
from bame.nm import is_nm, ungroup


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 16), (2, 8), (3, 5)])
def test_table_lists_each_combination_once_in_itertools_order(n, m):
    table = combination_table(n, m)
    combos = list(itertools.combinations(range(m), n))
    assert table.shape == (len(combos), m) == (math.comb(m, n), m)
    assert [tuple(row.nonzero().flatten().tolist()) for row in table] == combos
    scores = initial_scores(5, n, m)
    assert scores.shape == (5, len(combos))
    # every position's combinations sum to 1 at the start, as theirs
    assert torch.allclose(scores.double() @ table.double(), torch.ones(5, m, dtype=torch.float64))


def test_patterns_over_the_limit_are_refused_naming_pattern_and_count():
    assert check_combinations(4, 8) == 70 and check_combinations(2, 16) == 120 and check_combinations(1, 16) == 16
    with pytest.raises(ValueError, match=r"pattern 3:16 needs C\(16,3\)=560 scores per group of 16, above the "
                                         r"limit of 128: the scores alone would take 35x"):
        check_combinations(3, 16)
    with pytest.raises(ValueError, match=r"4:8 needs C\(8,4\)=70 .* limit of 64"):
        check_combinations(4, 8, limit=64)
    assert MAX_COMBINATIONS == 128


def _brute_mask(alive, n, m):
    combos = list(itertools.combinations(range(m), n))
    out = torch.zeros(alive.shape[0], m, dtype=torch.bool)
    for g in range(alive.shape[0]):
        for c, combo in enumerate(combos):
            if alive[g, c]:
                out[g, list(combo)] = True
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_mask_is_the_union_of_alive_combinations(n, m):
    gen = torch.Generator().manual_seed(m)
    table = combination_table(n, m)
    alive = torch.rand(40, len(table), generator=gen) < 0.3
    alive[0] = True  # all alive: dense
    alive[1] = False
    alive[1, -1] = True  # one alive: exactly that combination
    got = group_mask(alive, table)
    assert torch.equal(got, _brute_mask(alive, n, m))
    assert got[0].all() and got[1].sum() == n


def test_layer_mask_and_grouping_follow_the_layout():
    n, m = 1, 4
    table = combination_table(n, m)
    shape = (3, 8, 3, 3)
    groups = 3 * 8 * 9 // m
    gen = torch.Generator().manual_seed(0)
    alive = torch.zeros(groups, len(table), dtype=torch.bool)
    alive[torch.arange(groups), torch.randint(0, len(table), (groups,), generator=gen)] = True
    for layout in ("row", "channel"):
        mask = layer_mask(alive, table, shape, layout)
        assert mask.shape == shape and is_nm(mask, n, m, layout, exact=True)
        assert torch.equal(grouped(mask, m, layout), group_mask(alive, table))
    # channel layout: group g holds m consecutive input channels at one (cout, kh, kw)
    w = torch.arange(3 * 8 * 9.0).reshape(shape)
    assert grouped(w, m, "channel")[1].tolist() == w[0, 4:8, 0, 0].tolist()
    assert grouped(w, m, "channel")[2].tolist() == w[0, 0:4, 0, 1].tolist()
    assert grouped(w, m, "row")[1].tolist() == w.reshape(3, -1)[0, 4:8].tolist()


@pytest.mark.parametrize("layout", ["row", "channel"])
def test_score_gradient_is_straight_through_autograd(layout):
    """Their formulation run through autograd: soft mask (scores * alive) @ table, binarised forward,
    identity backward; the closed form must give the same score gradient."""
    n, m = 2, 4
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 8, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, generator=gen, dtype=torch.float64)
    table = combination_table(n, m)
    groups = w.numel() // m
    alive = torch.rand(groups, len(table), generator=gen) < 0.6
    alive[:, 0] = True
    scores = torch.randn(groups, len(table), generator=gen, dtype=torch.float64).requires_grad_(True)
    soft = (scores * alive) @ table.double()  # [G, m]
    hard = (soft != 0).double()
    mask_ste = soft + (hard - soft).detach()
    masked = w * ungroup(mask_ste.reshape(4, -1, m), w.shape, layout)
    masked.retain_grad()
    F.conv2d(x, masked, padding=1).pow(2).sum().backward()
    got = score_grad(masked.grad, w, alive, table, layout)
    assert torch.allclose(got, scores.grad)
    # and the sum over each combination's positions, by loops, on one group
    gw = grouped(masked.grad * w, m, layout)
    for c, combo in enumerate(itertools.combinations(range(m), n)):
        expect = float(gw[5, list(combo)].sum()) if alive[5, c] else 0.0
        assert float(got[5, c]) == pytest.approx(expect, abs=1e-12)


def _their_card(epoch: int, c: int, t_i: int, t_f: int, exponent: int = 3) -> int:
    """Their per-epoch rule: survivors of ``c`` at an integer epoch, the cut count frozen once it reaches c - 1."""
    if epoch >= t_f:
        return 1
    return min(c, 1 + math.ceil((c - 1) * (1 - (epoch - t_i) / (t_f - t_i)) ** exponent))


@pytest.mark.parametrize("n,m,firsts", [(2, 4, {1: 5, 2: 10, 3: 16, 4: 25, 5: 60}), (1, 4, {1: 8, 2: 19, 3: 60}),
                                        (1, 16, {14: 36, 15: 60})])
def test_schedule_in_fractions_reproduces_their_epochs(n, m, firsts):
    c = math.comb(m, n)
    epochs, t_f = 120, 60
    cuts = [c - surviving_combinations(e / epochs, c, 0.0, t_f / epochs) for e in range(epochs + 1)]
    assert cuts == [c - _their_card(e, c, 0, t_f) for e in range(epochs + 1)]
    for k, epoch in firsts.items():  # the research notes' table: the first epoch with k cut
        assert cuts.index(k) == epoch
    assert cuts == sorted(cuts) and cuts[0] == 0 and cuts[-1] == c - 1


def test_schedule_edges_exponent_and_bad_windows():
    assert surviving_combinations(0.05, 6, 0.1, 0.5) == 6 and surviving_combinations(0.5, 6, 0.1, 0.5) == 1
    assert surviving_combinations(0.3, 6, 0.1, 0.5) == 1 + math.ceil(5 * 0.5 ** 3)
    assert surviving_combinations(0.3, 6, 0.1, 0.5, exponent=4) == 1 + math.ceil(5 * 0.5 ** 4)
    for bad in [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)]:
        with pytest.raises(ValueError, match="0 <= t_i < t_f <= 1"):
            surviving_combinations(0.3, 6, *bad)
    with pytest.raises(ValueError, match="exponent"):
        surviving_combinations(0.3, 6, 0.1, 0.5, exponent=0)


def _brute_cut(scores, alive, survivors):
    out = torch.zeros_like(alive)
    for g in range(scores.shape[0]):
        live = [c for c in range(scores.shape[1]) if alive[g, c]]
        live.sort(key=lambda c: (-float(scores[g, c]), c))
        out[g, live[:survivors]] = True
    return out


def test_cuts_keep_the_highest_alive_scores_ties_to_the_lower_index():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(-3, 4, (50, 6), generator=gen).to(torch.float32)  # many ties
    alive = torch.rand(50, 6, generator=gen) < 0.8
    alive[:, 0] = True
    for survivors in range(1, 7):
        got = cut_combinations(scores, alive, survivors)
        assert torch.equal(got, _brute_cut(scores, alive, survivors))
        assert not (got & ~alive).any()  # nothing comes back
    assert cut_combinations(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 2).tolist() == [[True, True, False, False]]
    nan = torch.tensor([[float("nan"), 1.0, 2.0]])
    assert cut_combinations(nan, torch.ones(1, 3, dtype=torch.bool), 2).tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="survivors"):
        cut_combinations(scores, alive, 0)


def test_a_run_of_cuts_goes_from_dense_to_n_m():
    n, m = 2, 4
    table = combination_table(n, m)
    gen = torch.Generator().manual_seed(3)
    alive = torch.ones(30, len(table), dtype=torch.bool)
    density = []
    for step in range(101):
        scores = torch.randn(alive.shape, generator=gen)
        alive = cut_combinations(scores, alive, surviving_combinations(step / 100, len(table), 0.1, 0.6))
        density.append(float(group_mask(alive, table).float().mean()))
    assert density[0] == 1.0 and density == sorted(density, reverse=True)
    assert is_settled(alive) and density[-1] == n / m
    assert not is_settled(torch.ones(2, 6, dtype=torch.bool))


def test_elementwise_ops_count():
    # 2:4, 10 groups, 25 alive combinations, 30 kept weights: scoring 30 products + 2*25 adds; cutting
    # 10*6*3 comparisons and the mask rebuilt, 2*25 ORs
    assert lbc_elementwise_ops(10, 2, 4, 25, 30, cutting=False) == 30 + 50
    assert lbc_elementwise_ops(10, 2, 4, 25, 30, cutting=True) == 30 + 50 + 180 + 50
    assert lbc_elementwise_ops(10, 2, 4, 25, 30, cutting=True, scoring=False) == 180 + 50
    assert lbc_elementwise_ops(10, 2, 4, 25, 30, cutting=False, scoring=False) == 0
