import pytest
import torch

from bame.nm import (Layout, NMPattern, block_grid, from_blocks, group_counts, group_view, is_nm, nm_mask,
                     random_nm_mask, to_blocks, ungroup)


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), (" 1 : 16 ", 1, 16), ("4:4", 4, 4), ("1:1", 1, 1)])
def test_pattern_parses(text, n, m):
    p = NMPattern.parse(text)
    assert (p.n, p.m) == (n, m)
    assert str(p) == f"{n}:{m}"
    assert p.is_dense == (n == m)


@pytest.mark.parametrize("bad", ["5:4", "0:4", "2/4", "a:b", "", "2:4:8", "-1:4"])
def test_bad_pattern_names_itself(bad):
    with pytest.raises(ValueError, match="pattern"):
        NMPattern.parse(bad)


def test_pattern_from_tuple_and_identity():
    p = NMPattern(1, 8)
    assert NMPattern.parse(p) is p
    assert NMPattern.parse((1, 8)) == p
    assert p.density == 1 / 8


@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3), (6, 8, 1, 1), (3, 2, 2, 4)])
@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (1, 8), (4, 4)])
def test_nm_mask_keeps_n_largest_per_row_group(shape, n, m):
    torch.manual_seed(0)
    scores = torch.randn(shape)
    k = int(torch.tensor(shape[1:]).prod())
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    # Brute force against the documented convention: groups of m consecutive entries of reshape(Cout, -1).
    flat_scores, flat_mask = scores.reshape(shape[0], -1), mask.reshape(shape[0], -1)
    for r in range(shape[0]):
        for g in range(k // m):
            s = flat_scores[r, g * m:(g + 1) * m]
            kept = flat_mask[r, g * m:(g + 1) * m]
            assert int(kept.sum()) == n
            assert s[kept].min() >= s[~kept].max() if n < m else True
    assert is_nm(mask, n, m, exact=True)


def test_nm_mask_ties_are_deterministic_earlier_wins():
    mask = nm_mask(torch.ones(1, 8), 2, 4)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_indivisible_shape_raises_naming_shape_and_pattern():
    # the shape, the N:M pattern, K and a hint at the fix
    with pytest.raises(ValueError, match=r"\(4, 3, 3, 3\) cannot be N:M 2:4 \(M=4\): K=27 .*keep the layer dense"):
        nm_mask(torch.randn(4, 3, 3, 3), 2, 4)
    with pytest.raises(ValueError, match=r"\(8, 6\) cannot be N:M 1:4 \(M=4\): K=6 "):
        random_nm_mask((8, 6), 1, 4)
    with pytest.raises(ValueError, match=r"\(4, 6\) cannot be N:M 2:4 .*K=6"):
        block_grid((4, 6), 4, n=2)
    with pytest.raises(ValueError, match=r"\(4, 6\) cannot be N:M with M=4: K=6"):
        block_grid((4, 6), 4)  # no n: names M only
    with pytest.raises(ValueError, match="at least 2 dims"):
        nm_mask(torch.randn(8), 2, 4)


def test_channel_layout_groups_input_channels_at_each_kernel_position():
    torch.manual_seed(1)
    w = torch.randn(3, 8, 3, 3)
    mask = nm_mask(w.abs(), 2, 4, layout="channel")
    for kh in range(3):
        for kw in range(3):
            per_pos = mask[:, :, kh, kw].reshape(3, 2, 4)  # groups of 4 consecutive channels
            assert (per_pos.sum(-1) == 2).all()
    assert is_nm(mask, 2, 4, Layout.CHANNEL, exact=True)
    # The row layout sees the same mask differently: it is generally not 2:4 along K.
    assert group_view(w, 4, "channel").shape == (3, 18, 4)
    assert torch.equal(ungroup(group_view(w, 4, "channel"), w.shape, "channel"), w)
    with pytest.raises(ValueError, match=r"\(2, 6, 3, 3\) cannot be N:M 2:4 .*Cin/groups=6"):
        nm_mask(torch.randn(2, 6, 3, 3), 2, 4, layout="channel")


def test_is_nm_at_most_vs_exact():
    mask = torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert is_nm(mask, 2, 4)
    assert not is_nm(mask, 2, 4, exact=True)
    assert not is_nm(mask, 1, 4)
    assert group_counts(mask, 4).tolist() == [[1, 2]]


def test_random_mask_is_nm_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_nm_mask((4, 32), 1, 16, g1), random_nm_mask((4, 32), 1, 16, g2)
    assert torch.equal(a, b) and is_nm(a, 1, 16, exact=True)


@pytest.mark.parametrize("layout", ["row", "channel"])
@pytest.mark.parametrize("br,bg", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_blocks_round_trip_and_tile_correctly(layout, br, bg):
    w = torch.arange(4 * 12 * 3 * 1).reshape(4, 12, 3, 1).float()
    grid = block_grid(w.shape, 4, br, bg, layout)
    blocks = to_blocks(w, grid, layout)
    assert blocks.shape == (grid.num_blocks, br * bg, 4)
    assert torch.equal(from_blocks(blocks, grid, w.shape, layout), w)
    groups = group_view(w, 4, layout)  # [Cout, G, m]
    # Block 0 holds rows 0..br-1 and groups 0..bg-1.
    assert torch.equal(blocks[0], groups[:br, :bg].reshape(br * bg, 4))


def test_block_grid_rejects_untileable():
    with pytest.raises(ValueError, match="cannot be tiled"):
        block_grid((3, 16), 4, block_rows=2)
    with pytest.raises(ValueError, match="cannot be tiled"):
        block_grid((4, 16), 4, block_groups=3)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        Layout.parse("diagonal")
