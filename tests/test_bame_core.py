"""Pure LMA / OBF / selection math against brute force and constructed sequences."""

from __future__ import annotations

import itertools

import pytest
import torch

from bame.bame_core import (OBFState, adaptation_elementwise_ops, apply_swaps, block_swaps, effective_frequency,
                            gradient_grow_scale, obf_step, oscillation_events, select_blocks, selection_budget,
                            swap_values)
from bame.nm import random_nm_mask


def _blocks(nb: int, gpb: int, n: int, m: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(nb, gpb, m, generator=gen, dtype=dtype)
    g = torch.randn(nb, gpb, m, generator=gen, dtype=dtype)
    mask = random_nm_mask((nb * gpb, m), n, m, gen).reshape(nb, gpb, m)
    return w, g, mask


def _all_pairs(mask_block: torch.Tensor):
    """Every (group, i kept, j pruned) of one block."""
    for grp in range(mask_block.shape[0]):
        kept = mask_block[grp].nonzero().flatten().tolist()
        pruned = (~mask_block[grp]).nonzero().flatten().tolist()
        for i in kept:
            for j in pruned:
                yield grp, i, j


def _brute_best_sets(a, b, mask_block, k):
    """Max total R over every set of 1..k swaps with distinct weights (brute force)."""
    pairs = [(grp, i, j, float(a[grp, i] - b[grp, j])) for grp, i, j in _all_pairs(mask_block)]
    best = -float("inf")
    for size in range(1, k + 1):
        for combo in itertools.combinations(pairs, size):
            used = [(p[0], p[1]) for p in combo] + [(p[0], p[2]) for p in combo]
            if len(set(used)) < len(used):
                continue
            best = max(best, sum(p[3] for p in combo))
    return best


@pytest.mark.parametrize("n,m,gpb", [(2, 4, 1), (2, 4, 3), (1, 4, 2), (1, 8, 2), (3, 8, 2)])
def test_taylor_single_swap_is_the_brute_force_best(n, m, gpb):
    w, g, mask = _blocks(12, gpb, n, m, seed=n * 10 + m)
    sw = block_swaps(w, g, mask, n, "taylor", 1)
    for blk in range(w.shape[0]):
        best = max(float(g[blk, grp, i] * w[blk, grp, i] - g[blk, grp, j] * w[blk, grp, j])
                   for grp, i, j in _all_pairs(mask[blk]))
        assert float(sw.score[blk]) == pytest.approx(best, abs=1e-12)
        drop, grow = sw.drop[blk], sw.grow[blk]
        assert int(drop.sum()) == 1 and int(grow.sum()) == 1
        (gd, i), (gg, j) = drop.nonzero().tolist()[0], grow.nonzero().tolist()[0]
        assert gd == gg and mask[blk, gd, i] and not mask[blk, gg, j]
        assert float(g[blk, gd, i] * w[blk, gd, i] - g[blk, gd, j] * w[blk, gd, j]) == pytest.approx(best, abs=1e-12)
    assert int(sw.num_swaps.min()) == 1


@pytest.mark.parametrize("n,m,gpb,k", [(2, 4, 2, 2), (2, 4, 2, 3), (2, 8, 2, 3), (1, 4, 3, 2)])
def test_taylor_k_swaps_maximise_the_total_over_disjoint_pairs(n, m, gpb, k):
    w, g, mask = _blocks(6, gpb, n, m, seed=k)
    a, b = swap_values(w, g, "taylor")
    sw = block_swaps(w, g, mask, n, "taylor", k)
    for blk in range(w.shape[0]):
        best = _brute_best_sets(a[blk], b[blk], mask[blk], k)
        plan_total = float((a[blk] * sw.drop[blk]).sum() - (b[blk] * sw.grow[blk]).sum())
        if float(sw.pair_scores[blk, 0]) > 0:
            assert plan_total == pytest.approx(best, abs=1e-9)
            assert float(sw.score[blk]) == pytest.approx(best, abs=1e-9)
        else:  # nothing helps: the plan is the single best (non-positive) swap
            assert int(sw.num_swaps[blk]) == 1
            assert float(sw.score[blk]) == pytest.approx(best, abs=1e-9)
        new = apply_swaps(mask[blk:blk + 1], sw.drop[blk:blk + 1], sw.grow[blk:blk + 1])
        assert (new.sum(-1) == n).all()
        assert not (sw.drop[blk] & sw.grow[blk]).any()


def test_gradient_lma_is_rigl_pair_with_consistent_score():
    n, m = 2, 8
    w, g, mask = _blocks(10, 1, n, m, seed=3)
    scale = gradient_grow_scale(w.reshape(-1, m), mask.reshape(-1, m))
    assert float(scale) == pytest.approx(float(w.abs()[mask].mean()))
    sw = block_swaps(w, g, mask, n, "gradient", 1, scale)
    for blk in range(10):
        kept = mask[blk, 0]
        i = int(torch.where(kept, (g * w).abs()[blk, 0], torch.tensor(float("inf"), dtype=w.dtype)).argmin())
        j = int(torch.where(~kept, g.abs()[blk, 0], torch.tensor(-1.0, dtype=w.dtype)).argmax())
        assert sw.drop[blk, 0].nonzero().flatten().tolist() == [i]
        assert sw.grow[blk, 0].nonzero().flatten().tolist() == [j]
        expected = float(scale * g[blk, 0, j].abs() - (g[blk, 0, i] * w[blk, 0, i]).abs())
        assert float(sw.score[blk]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="grow_scale"):
        block_swaps(w, g, mask, n, "gradient", 1)


def test_non_finite_gradients_never_score():
    w, g, mask = _blocks(4, 2, 2, 4)
    g[1, 0, 0] = float("nan")
    g[2] = float("inf")
    sw = block_swaps(w, g, mask, 2)
    assert torch.isfinite(sw.score[[0, 3]]).all()
    assert sw.score[2] == -float("inf")
    sel = select_blocks(sw.score, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool),
                        torch.zeros(4), budget=4)
    assert not sel[2]


def test_bad_shapes_are_named():
    w, g, mask = _blocks(2, 1, 2, 4)
    with pytest.raises(ValueError, match=r"\[B, G, m\]"):
        block_swaps(w, g[:1], mask, 2)


# -- OBF --------------------------------------------------------------------------------------------

A = torch.tensor([[[True, True, False, False]]])
B = torch.tensor([[[True, False, True, False]]])
C = torch.tensor([[[False, True, True, False]]])
ONE = torch.ones(1, dtype=torch.bool)


def _run(seq, **kw):
    st = OBFState.initial(1, 1, 4)
    events = []
    for old, new in zip(seq, seq[1:]):
        st, ev = obf_step(st, old, new, ONE, **{"beta": 0.9, "tau": 0.5, "min_changes": 2, **kw})
        events.append(bool(ev))
    return st, events


def test_oscillation_a_b_a_is_detected_and_a_b_c_is_not():
    st, events = _run([A, B, A])
    assert events == [False, True]
    assert int(st.changes) == 2
    assert float(st.frequency) == pytest.approx(0.1)  # 0.9 * (0.9 * 0 + 0.1 * 0) + 0.1 * 1
    _, events = _run([A, B, C, B])
    assert events == [False, False, True]
    _, events = _run([A, B, C, A])
    assert events == [False, False, False]


def test_oscillation_events_helper_matches_obf_step():
    st = OBFState.initial(1, 1, 4)
    st, _ = obf_step(st, A, B, ONE, 0.9, 0.5, 2)
    assert bool(oscillation_events(B, A, st)) and not bool(oscillation_events(B, C, st))
    assert not bool(oscillation_events(B, B, st))  # no change is no event


def test_changed_update_leaves_unchanged_blocks_alone_candidates_decays_them():
    st, _ = _run([A, B, A, A, A], update_on="changed")
    assert float(st.frequency) == pytest.approx(0.1) and int(st.updates) == 2
    st, _ = _run([A, B, A, A, A], update_on="candidates")
    assert float(st.frequency) == pytest.approx(0.1 * 0.9 * 0.9) and int(st.updates) == 4


def test_freezing_at_tau_needs_min_changes():
    st, _ = _run([A, B, A], beta=0.5, tau=0.5)  # f = 0.5 after the first oscillation, 2 changes
    assert bool(st.frozen)
    st, _ = _run([A, B, A], beta=0.5, tau=0.5, min_changes=3)
    assert not bool(st.frozen)
    st, _ = _run([A, B, A], beta=0.5, tau=0.6)
    assert not bool(st.frozen)
    st, _ = _run([A, B, A, B], beta=0.5, tau=0.6)  # second oscillation: f = 0.75
    assert float(st.frequency) == pytest.approx(0.75) and bool(st.frozen)
    st, _ = _run([A, B, A, B], beta=0.5, tau=0.6, freeze=False)
    assert not bool(st.frozen)


def test_bias_correction_freezes_a_first_oscillation():
    st, _ = _run([A, B, A], beta=0.9, tau=0.5)
    assert not bool(st.frozen)
    st, _ = _run([A, B, A], beta=0.9, tau=0.5, bias_correction=True)
    assert float(effective_frequency(st, 0.9, True)) == pytest.approx(0.1 / (1 - 0.81))
    assert bool(st.frozen)


def test_frozen_stays_frozen_and_state_is_per_block():
    old = torch.cat([A, A, A])
    new = torch.cat([B, A, C])
    st = OBFState.initial(3, 1, 4)
    st, ev = obf_step(st, old, new, torch.ones(3, dtype=torch.bool), 0.5, 0.5, 2)
    assert st.changes.tolist() == [1, 0, 1] and st.has_prev.tolist() == [True, False, True]
    assert torch.equal(st.prev_state[0], A[0]) and not ev.any()
    st2, ev = obf_step(st, new, old, torch.ones(3, dtype=torch.bool), 0.5, 0.5, 2)
    assert ev.tolist() == [True, False, True] and st2.frozen.tolist() == [True, False, True]
    st3, _ = obf_step(st2, old, old, torch.ones(3, dtype=torch.bool), 0.5, 0.5, 2, update_on="candidates")
    assert st3.frozen.tolist() == [True, False, True]


# -- selection --------------------------------------------------------------------------------------

def test_select_top_budget_among_eligible():
    score = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, float("nan"), 4.0])
    cand = torch.tensor([True, True, True, True, True, True, False])
    frozen = torch.tensor([False, False, False, True, False, False, False])
    f = torch.zeros(7)
    sel = select_blocks(score, cand, frozen, f, budget=2)
    assert sel.nonzero().flatten().tolist() == [1, 4]  # 3.0 is frozen, 4.0 is no candidate
    sel = select_blocks(score, cand, frozen, f, budget=10)
    assert sel.nonzero().flatten().tolist() == [0, 1, 4]  # R <= 0 and nan never
    assert not select_blocks(score, cand, frozen, f, budget=0).any()


def test_joint_selection_ranks_by_frequency_penalised_score_and_ignores_frozen():
    score = torch.tensor([1.0, 1.5, 0.9])
    f = torch.tensor([0.0, 1.0, 0.0])
    ones, frozen = torch.ones(3, dtype=torch.bool), torch.tensor([True, False, False])
    sel = select_blocks(score, ones, frozen, f, budget=2, selection="joint", joint_lambda=1.0)
    assert sel.nonzero().flatten().tolist() == [0, 2]  # 1.5 / 2 = 0.75 loses to 0.9
    sel = select_blocks(score, ones, frozen, f, budget=2, selection="freeze_then_topk")
    assert sel.nonzero().flatten().tolist() == [1, 2]


def test_ties_go_to_the_lower_block():
    score = torch.ones(5)
    ones, zeros = torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)
    assert select_blocks(score, ones, zeros, torch.zeros(5), 2).nonzero().flatten().tolist() == [0, 1]


def test_selection_budget_rounding():
    assert selection_budget(0.05, 100) == 5
    assert selection_budget(0.05, 100, "ceil") == 5
    assert selection_budget(0.05, 30) == 2  # 1.5 half up
    assert selection_budget(0.05, 30, "floor") == 1
    assert selection_budget(0.05, 30, "ceil") == 2
    assert selection_budget(0.001, 30) == 0
    assert selection_budget(0.001, 30, "ceil") == 1
    assert selection_budget(2.0, 30) == 30
    with pytest.raises(ValueError, match="rounding"):
        selection_budget(0.1, 10, "nearest")


def test_elementwise_ops():
    assert adaptation_elementwise_ops(0, 1, 4, 2, 1, "taylor", "freeze_then_topk", 0, 0) == 0
    # 10 candidate 1x1 blocks of 2:4, single swaps, taylor, 2 changed:
    # per block 4 (g*w) + 1 * (4 + 1) + 1 = 10; selection 10*2 + 10*4; OBF 2*(2*4) + 2*5
    assert adaptation_elementwise_ops(10, 1, 4, 2, 1, "taylor", "freeze_then_topk", 2, 2) == 100 + 60 + 26
    more = adaptation_elementwise_ops(20, 1, 4, 2, 1, "taylor", "freeze_then_topk", 2, 2)
    assert more > 186
    assert adaptation_elementwise_ops(10, 1, 4, 2, 1, "gradient", "joint", 2, 2, layer_numel=40) > 186


@pytest.mark.parametrize("lma", ["taylor", "gradient"])
@pytest.mark.parametrize("n,m,gpb", [(2, 4, 1), (1, 4, 3), (1, 16, 1), (3, 8, 2)])
def test_single_swap_fast_path_equals_the_sorting_path(lma, n, m, gpb):
    """The arg-max path for one swap per block gives the sorting path's plan exactly, ties included."""
    gen = torch.Generator().manual_seed(n * 100 + m + gpb)
    nb = 300
    w = torch.randn(nb, gpb, m, generator=gen)
    g = torch.randn(nb, gpb, m, generator=gen)
    w[:50] = w[:50].round()  # many ties
    g[:50] = g[:50].sign()
    g[50:60] = 0.0  # all-equal scores
    mask = torch.zeros(nb, gpb, m, dtype=torch.bool)
    order = torch.rand(nb, gpb, m, generator=gen).argsort(-1)[..., :n]
    mask.scatter_(-1, order, True)
    scale = torch.tensor(0.7) if lma == "gradient" else None
    fast = block_swaps(w, g, mask, n, lma, 1, scale)
    slow = block_swaps(w, g, mask, n, lma, 1, scale, _force_sort=True)
    for f in ("score", "drop", "grow", "num_swaps", "pair_scores"):
        assert torch.equal(getattr(fast, f), getattr(slow, f)), f


@pytest.mark.parametrize("selection", ["freeze_then_topk", "joint"])
@pytest.mark.parametrize("budget", [1, 7, 50, 199, 200, 500])
def test_selection_without_sorting_equals_the_stable_sort(selection, budget):
    """The k-th value threshold path selects exactly the stable sort's top ``budget`` (ties: lower index)."""
    gen = torch.Generator().manual_seed(budget)
    nb = 200
    score = torch.randn(nb, generator=gen).round(decimals=1)  # many ties
    score[:20] = 0.5
    score[20:30] = float("-inf")
    candidates = torch.rand(nb, generator=gen) < 0.8
    frozen = torch.rand(nb, generator=gen) < 0.1
    frequency = torch.rand(nb, generator=gen).round(decimals=1)
    fast = select_blocks(score, candidates, frozen, frequency, budget, selection, 0.5)
    slow = select_blocks(score, candidates, frozen, frequency, budget, selection, 0.5, _force_sort=True)
    assert torch.equal(fast, slow) and int(fast.sum()) <= budget
