"""The compressed forms hold exactly W*m (and its transpose), and re-packing follows the weights."""

import pytest
import torch

from bame.nm import group_view, random_nm_mask, ungroup
from bame.nm_compressed import NMIndex, group_offsets


def _ell_dense(ell, values):
    """The ``[R, C]`` matrix an ELL form describes (duplicate columns add up, as in the product)."""
    rows, ncols = ell.shape
    out = torch.zeros(rows, ncols, dtype=values.dtype)
    out.scatter_add_(1, ell.cols.t(), values.t())
    return out


def _short_mask(shape, n, m, layout):
    """An N:M mask in which some groups keep fewer than N (BAME and `is_nm` allow that)."""
    mask = random_nm_mask(shape, n, m, torch.Generator().manual_seed(1), layout)
    groups = group_view(mask, m, layout).clone()  # [Cout, G, M]
    groups[0] = False  # every group of row 0 empty
    groups[1, ::2] &= torch.arange(m) == groups[1, ::2].float().argmax(-1, keepdim=True)  # one kept
    return ungroup(groups, shape, layout)


CASES = [((8, 4, 3, 3), 2, 4, "row"), ((8, 4, 3, 3), 1, 4, "channel"), ((6, 32), 1, 16, "row"),
         ((4, 16, 1, 1), 2, 8, "channel")]


@pytest.mark.parametrize("shape,n,m,layout", CASES)
@pytest.mark.parametrize("short", [False, True])
def test_every_form_holds_the_masked_weight(shape, n, m, layout, short):
    mask = _short_mask(shape, n, m, layout) if short else random_nm_mask(shape, n, m, layout=layout)
    w = torch.randn(shape, dtype=torch.float64)
    a = (w * mask).reshape(shape[0], -1)
    index = NMIndex(mask, f"{n}:{m}", layout)
    k = a.shape[1]
    assert index.ell.width == k // m * n  # N per group: no row pointers
    assert (index.ell.keep is not None) == short  # short groups are padded with value-0 entries
    torch.testing.assert_close(_ell_dense(index.ell, index.ell.pack(w)), a, rtol=0, atol=0)
    torch.testing.assert_close(_ell_dense(index.ell_t, index.ell_t.pack(w)), a.t(), rtol=0, atol=0)
    assert index.ell_t.padding >= 1.0
    torch.testing.assert_close(index.csr.pack(w).to_dense(), a, rtol=0, atol=0)
    torch.testing.assert_close(index.csr_t.pack(w).to_dense(), a.t(), rtol=0, atol=0)
    torch.testing.assert_close(index.csr.pack(w, blocked=True).to_dense(), a, rtol=0, atol=0)
    assert index.csr.src.numel() == int(mask.sum())  # CSR holds the kept entries only


def test_group_offsets_name_the_kept_slots():
    mask = random_nm_mask((5, 24), 2, 8, torch.Generator().manual_seed(0))
    off = group_offsets(mask, "2:8")
    assert off.dtype == torch.uint8 and off.shape == (5, 3, 2)
    rebuilt = torch.zeros(5, 3, 8, dtype=torch.bool).scatter_(2, off.long(), True)
    assert torch.equal(rebuilt.reshape(5, 24), mask)


def test_repack_follows_the_weights_without_a_rebuild():
    shape = (8, 16, 3, 3)
    mask = random_nm_mask(shape, 1, 16)
    index = NMIndex(mask, "1:16")
    for seed in range(3):  # the optimizer moves the weights; the index stays
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        a = (w * mask).reshape(8, -1)
        torch.testing.assert_close(index.csr_t.pack(w).to_dense(), a.t(), rtol=0, atol=0)
        torch.testing.assert_close(_ell_dense(index.ell, index.ell.pack(w)), a, rtol=0, atol=0)


def test_a_mask_that_is_not_n_m_is_refused():
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"not 2:4 in layout row"):
        NMIndex(mask, "2:4")
