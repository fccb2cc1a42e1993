"""Compressed forms of an N:M-masked weight, split into a fixed index structure and re-packed values.

The mask of a layer changes only when a method adapts it; the weights change every step. So each
compressed form is two things:

- an **index structure**, built from the mask alone, once per mask version (the "rebuild"): which
  entries of ``W`` are kept and where each of them comes from in ``weight.reshape(-1)`` (``src``);
- its **values**, re-packed from the current weight every step by one ``index_select`` through
  ``src`` (the "re-pack"): ``nnz`` reads, no look at the mask, no sorting, no host sync.

Two operands per weight ``W[Cout, K]`` (the N:M convention of :mod:`bame.nm`, layouts ``row`` and
``channel``): ``A = W*m`` ``[Cout, K]`` for the forward (``Y^T = A @ X^T``) and ``A^T`` ``[K, Cout]`` for
the input gradient (``dX^T = A^T @ dY^T``). Each comes in two forms:

- **ELL** (:class:`EllIndex`, "gather N of M" for ``A``): a fixed number ``T`` of entries per row,
  as column indices and values ``[T, R]`` (entry-major, the layout the gather-multiply-sum reduces
  over). For ``A`` every row keeps exactly ``G*N`` entries (N in each of its G groups; a group that
  keeps fewer is padded with one of its masked positions, value 0): no row pointers. The compact
  record of that structure is the in-group offsets ``[Cout, G, N]`` (uint8, :func:`group_offsets`).
  For ``A^T`` the column counts of ``A`` vary, so ``T`` is the largest one and shorter rows are padded
  with value-0 entries (:attr:`EllIndex.padding` says how much work that adds).
- **CSR** (:class:`CsrIndex`): PyTorch sparse CSR, or BSR with 1x1 blocks (MKL's other code path on
  x86; blocks larger than 1x1 store mostly zeros for N:M, whose kept positions do not line up across
  rows, and MKL takes square blocks only).

Memory: each form holds 8-16 bytes of indices per kept weight; build only the forms a kernel uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from .kernels import GatherPlan  # the CSR pattern of a bool matrix (row pointers, columns, flat positions)
from .nm import Layout, NMPattern, group_view, is_nm

__all__ = ["EllIndex", "CsrIndex", "NMIndex", "group_offsets"]


@dataclass(frozen=True)
class EllIndex:
    """``T`` entries per row of an ``[R, C]`` matrix: ``out[r] = sum_t values[t, r] * dense[cols[t, r]]``."""

    shape: tuple[int, int]  # (R, C) of the matrix this describes
    cols: torch.Tensor  # [T, R] int64: column of the t-th entry of row r
    src: torch.Tensor  # [cols.numel()] int64: position of that entry in weight.reshape(-1)
    keep: Optional[torch.Tensor]  # [cols.numel()] bool, False at padding entries; None when there are none

    @property
    def width(self) -> int:
        return self.cols.shape[0]

    @property
    def padding(self) -> float:
        """Stored entries / kept entries (1.0: no padding; the extra multiply-adds are by zeros)."""
        stored = self.cols.numel()
        return stored / max(1, int(self.keep.sum())) if self.keep is not None else 1.0

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The values (``cols``' shape) for the current ``weight`` (padding entries are 0)."""
        values = weight.reshape(-1).index_select(0, self.src)
        if self.keep is not None:
            values = values * self.keep
        return values.view(self.cols.shape)


@dataclass(frozen=True)
class CsrIndex:
    """The CSR structure of the kept entries of an ``[R, C]`` matrix (columns sorted in each row)."""

    shape: tuple[int, int]
    crow: torch.Tensor  # [R + 1] row pointers (int32 below 2^31 entries, as GatherPlan builds them)
    col: torch.Tensor  # [nnz] column indices
    src: torch.Tensor  # [nnz] int64: position of each entry in weight.reshape(-1)

    def pack(self, weight: torch.Tensor, blocked: bool = False) -> torch.Tensor:
        """A sparse CSR tensor (``blocked``: BSR with 1x1 blocks) holding the current ``weight``'s values."""
        values = weight.reshape(-1).index_select(0, self.src)
        with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            if blocked:
                return torch.sparse_bsr_tensor(self.crow, self.col, values.view(-1, 1, 1), self.shape,
                                               check_invariants=False)
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)


def _ell_at(kept: torch.Tensor, source: torch.Tensor, cols: torch.Tensor) -> EllIndex:
    """ELL whose row r holds the columns ``cols[r]`` (``[R, T]``) of ``kept`` ``[R, C]``; ``source[R, C]`` gives
    each entry's flat weight position, and a listed column that ``kept`` does not keep is padding (value 0)."""
    keep = kept.gather(1, cols)
    return EllIndex(tuple(kept.shape), cols.t().contiguous(), source.gather(1, cols).t().reshape(-1).contiguous(),
                    None if bool(keep.all()) else keep.t().reshape(-1).contiguous())


def _ell_of(kept: torch.Tensor, source: torch.Tensor) -> EllIndex:
    """ELL of the True entries of ``kept`` ``[R, C]``: each row lists its kept columns in ascending order, then
    padding entries (masked columns) up to the largest row count."""
    width = max(1, int(kept.sum(1).max())) if kept.numel() else 1  # one host read, at build time only
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # kept first
    return _ell_at(kept, source, order)


def _csr_of(kept: torch.Tensor, source: torch.Tensor) -> CsrIndex:
    """CSR of the True entries of ``kept`` ``[R, C]``; ``source`` as in :func:`_ell_of`."""
    plan = GatherPlan.build(kept)
    return CsrIndex(plan.shape, plan.crow, plan.col, source.reshape(-1)[plan.flat])


def group_offsets(mask: torch.Tensor, pattern: NMPattern | str, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """The in-group positions of the kept entries: uint8 ``[Cout, G, N]`` (ascending; a group keeping
    fewer than N is completed with its first masked positions). Raises ``ValueError`` if ``mask`` is not N:M."""
    pattern = NMPattern.parse(pattern)
    if not is_nm(mask, pattern.n, pattern.m, layout):
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not {pattern} in layout {Layout.parse(layout).value}: "
                         f"build the index from the layer's own mask and pattern")
    groups = group_view(mask.to(torch.bool), pattern.m, layout)  # [Cout, G, M]
    order = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :pattern.n]
    return order.sort(dim=-1).values.to(torch.uint8)


class NMIndex:
    """The index structures of one N:M mask, each built on first use; stale once the mask changes.

    ``mask`` has the weight's shape (``[Cout, ...]``); ``pattern`` and ``layout`` are the layer's.
    """

    def __init__(self, mask: torch.Tensor, pattern: NMPattern | str, layout: Layout | str = Layout.ROW) -> None:
        self.pattern, self.layout = NMPattern.parse(pattern), Layout.parse(layout)
        self.weight_shape = tuple(mask.shape)
        self.offsets = group_offsets(mask, self.pattern, self.layout)  # validates the mask
        cout = mask.shape[0]
        self._kept = mask.reshape(cout, -1).to(torch.bool)  # [Cout, K], PyTorch order
        self._source = torch.arange(self._kept.numel(), device=mask.device).view_as(self._kept)

    @cached_property
    def ell(self) -> EllIndex:
        """ELL of ``A = W*m``: ``G*N`` entries per row, built from the in-group offsets."""
        cout, k = self._kept.shape
        m = self.pattern.m
        # The PyTorch column (0..K-1) of each slot of each group, in the layer's layout: [G, M].
        slots = group_view(torch.arange(k, device=self._kept.device).view(1, *self.weight_shape[1:]), m,
                           self.layout)[0]
        cols = slots.expand(cout, -1, -1).gather(2, self.offsets.long()).reshape(cout, -1)  # [Cout, G*N]
        return _ell_at(self._kept, self._source, cols)

    @cached_property
    def ell_t(self) -> EllIndex:
        """ELL of ``A^T`` (``[K, Cout]``), padded to the largest column count of ``A``."""
        return _ell_of(self._kept.t(), self._source.t())

    @cached_property
    def conv_t(self) -> EllIndex:
        """ELL of the transposed conv (the input gradient as a direct convolution): row ``c`` lists the kept
        ``(o, i, j)`` of ``W[o, c, kh-1-i, kw-1-j]``, ``[Cin, Cout*kh*kw]`` (flipped taps), padded to the
        largest row. For a 2-D weight this is :attr:`ell_t`'s matrix."""
        shape = self.weight_shape if len(self.weight_shape) == 4 else self.weight_shape + (1, 1)
        cin = shape[1]

        def flipped(t: torch.Tensor) -> torch.Tensor:  # [Cout, K] -> [Cin, Cout*kh*kw]
            return t.view(shape).transpose(0, 1).flip(2, 3).reshape(cin, -1)

        return _ell_of(flipped(self._kept), flipped(self._source))

    @cached_property
    def csr(self) -> CsrIndex:
        """CSR of ``A = W*m`` (``[Cout, K]``)."""
        return _csr_of(self._kept, self._source)

    @cached_property
    def csr_t(self) -> CsrIndex:
        """CSR of ``A^T`` (``[K, Cout]``)."""
        return _csr_of(self._kept.t().contiguous(), self._source.t().contiguous())
