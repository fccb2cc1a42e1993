"""Bi-Mask's backward mask and permutation search against loops over their rule and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from bame.bimask_core import (backward_mask, is_nm_along_permuted_cout, score_permutations, search_permutation)
from bame.nm import nm_mask


def _reference_backward(w: torch.Tensor, fwd: torch.Tensor, perm: list, n: int, m: int) -> torch.Tensor:
    """Their steps, one column and one group at a time: permute rows, top-n |W*m_f| of each group of m
    permuted rows (kept weights before pruned ones, then larger first, then earlier), AND m_f, unpermute."""
    w2, f2 = w.reshape(w.shape[0], -1), fwd.reshape(w.shape[0], -1)
    out = torch.zeros_like(f2)
    for k in range(w2.shape[1]):
        for start in range(0, w2.shape[0], m):
            rows = perm[start:start + m]
            ranked = sorted(range(m), key=lambda i: (not bool(f2[rows[i], k]), -float(w2[rows[i], k].abs()), i))
            for i in ranked[:n]:
                out[rows[i], k] = bool(f2[rows[i], k])
    return out.reshape(w.shape)


@pytest.mark.parametrize("shape,n,m", [((8, 12), 2, 4), ((8, 3, 3, 3), 1, 4), ((16, 8), 1, 8), ((6, 4, 1, 1), 2, 3)])
def test_backward_mask_follows_their_rule(shape, n, m):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen)
    k = w[0].numel()
    fwd = nm_mask(w.abs(), n, m) if k % m == 0 else torch.rand(shape, generator=gen) < 0.5
    for _ in range(3):
        perm = torch.randperm(shape[0], generator=gen)
        got = backward_mask(w, fwd, perm, n, m)
        assert got.shape == w.shape and got.dtype == torch.bool
        assert torch.equal(got, _reference_backward(w, fwd, perm.tolist(), n, m))
        assert not (got & ~fwd).any()  # a subset of the forward mask
        assert is_nm_along_permuted_cout(got, perm, n, m)
        # exactly min(n, f) per group of m permuted output channels
        f_counts = fwd.reshape(shape[0], -1)[perm].reshape(shape[0] // m, m, -1).sum(1)
        b_counts = got.reshape(shape[0], -1)[perm].reshape(shape[0] // m, m, -1).sum(1)
        assert torch.equal(b_counts, f_counts.clamp(max=n))
        assert int(got.sum()) == int(score_permutations(fwd, perm[None], n, m)[0])


def test_a_kept_zero_weight_still_ranks_above_pruned_ones():
    # their top-1 of |W * m_f| = [0, 0, 0, 0] would pick row 0 (pruned) and the AND would leave nothing
    w = torch.tensor([[0.0], [5.0], [0.0], [0.0]])
    fwd = torch.tensor([[False], [False], [True], [False]])
    got = backward_mask(w, fwd, torch.arange(4), 1, 4)
    assert got[:, 0].tolist() == [False, False, True, False]


def test_the_permutation_matters_and_identity_order_is_not_nm():
    # column 0 keeps rows 0, 1 forward: together in one group under the identity, apart under p
    fwd = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool).repeat(2, 1)  # [8, 2]
    w = torch.ones(8, 2)
    ident, swapped = torch.arange(8), torch.tensor([0, 2, 1, 3, 4, 6, 5, 7])
    assert int(backward_mask(w, fwd, ident, 1, 2).sum()) == 4
    got = backward_mask(w, fwd, swapped, 1, 2)
    assert int(got.sum()) == 8 and torch.equal(got, fwd)  # every group of p holds one forward weight
    assert is_nm_along_permuted_cout(got, swapped, 1, 2) and not is_nm_along_permuted_cout(got, ident, 1, 2)


def test_scores_of_every_permutation_match_the_backward_masks():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 9, generator=gen)
    fwd = nm_mask(w.abs(), 1, 3)
    perms = torch.tensor(list(itertools.permutations(range(6))))  # all 720
    scores = score_permutations(fwd, perms, 1, 3)
    brute = torch.tensor([int(backward_mask(w, fwd, p, 1, 3).sum()) for p in perms])
    assert torch.equal(scores, brute)
    assert len(set(brute.tolist())) > 1  # the case discriminates between permutations


def test_search_is_the_first_best_of_the_generators_draws():
    gen_w = torch.Generator().manual_seed(2)
    w = torch.randn(8, 12, generator=gen_w)
    fwd = nm_mask(w.abs(), 2, 4)
    found = search_permutation(fwd, 2, 4, greedy_num=30, generator=torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    draws = [torch.randperm(8, generator=replay) for _ in range(30)]
    counts = [int(backward_mask(w, fwd, p, 2, 4).sum()) for p in draws]
    first_best = counts.index(max(counts))
    assert torch.equal(found.permutation, draws[first_best])
    assert found.retained == max(counts) and found.candidates == 30
    again = search_permutation(fwd, 2, 4, 30, torch.Generator().manual_seed(7))
    assert torch.equal(again.permutation, found.permutation)  # deterministic given the generator


def test_search_over_enough_draws_finds_the_global_optimum():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 9, generator=gen)
    fwd = nm_mask(w.abs(), 2, 3)
    perms = torch.tensor(list(itertools.permutations(range(6))))
    counts = [int(backward_mask(w, fwd, p, 2, 3).sum()) for p in perms]
    found = search_permutation(fwd, 2, 3, greedy_num=300, generator=torch.Generator().manual_seed(0))
    assert found.retained == max(counts)
    assert int(backward_mask(w, fwd, found.permutation, 2, 3).sum()) == max(counts)
    assert min(counts) < max(counts)  # a search that ignored the scores would be caught


def test_incumbent_is_kept_unless_a_draw_retains_strictly_more():
    fwd = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool).repeat(2, 1)
    best = torch.tensor([0, 2, 1, 3, 4, 6, 5, 7])  # retains all 8: no draw can beat it, some tie it
    found = search_permutation(fwd, 1, 2, 200, torch.Generator().manual_seed(0), incumbent=best)
    assert torch.equal(found.permutation, best) and found.retained == 8 and found.candidates == 201
    without = search_permutation(fwd, 1, 2, 200, torch.Generator().manual_seed(0))
    assert without.retained == 8 and not torch.equal(without.permutation, best)  # a tying draw came first
    replaced = search_permutation(fwd, 1, 2, 200, torch.Generator().manual_seed(0), incumbent=torch.arange(8))
    assert torch.equal(replaced.permutation, without.permutation)  # the identity retains only 4


def test_density_on_gaussian_weights_matches_the_closed_form():
    # identity permutation, iid W: each group of 4 output channels holds Bin(4, 1/2) forward weights at a
    # column (rows are independent), so E[density] = E[min(2, Bin(4, 1/2))] / 4 = 26/64
    w = torch.randn(256, 576, generator=torch.Generator().manual_seed(4))
    fwd = nm_mask(w.abs(), 2, 4)
    density = float(backward_mask(w, fwd, torch.arange(256), 2, 4).float().mean())
    assert density == pytest.approx(26 / 64, abs=0.005)


def test_bad_shapes_and_permutations_are_refused():
    with pytest.raises(ValueError, match=r"\(6, 8\) cannot have a Bi-Mask backward mask N:M 2:4 along Cout: Cout=6"):
        backward_mask(torch.randn(6, 8), torch.ones(6, 8, dtype=torch.bool), torch.arange(6), 2, 4)
    with pytest.raises(ValueError, match=r"permutation of range\(8\)"):
        backward_mask(torch.randn(8, 4), torch.ones(8, 4, dtype=torch.bool), torch.tensor([0] * 8), 2, 4)
    with pytest.raises(ValueError, match="forward mask shape"):
        backward_mask(torch.randn(8, 4), torch.ones(8, 8, dtype=torch.bool), torch.arange(8), 2, 4)
    with pytest.raises(ValueError, match="greedy_num"):
        search_permutation(torch.ones(8, 4, dtype=torch.bool), 2, 4, 0, torch.Generator())
