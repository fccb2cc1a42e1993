"""Pure N:M mask math. Tensors in, tensors out, no hidden state.

The one N:M convention of this package
--------------------------------------
A weight of any shape ``[Cout, ...]`` is viewed as ``W[Cout, K]`` with ``K = prod(shape[1:])``, in
PyTorch's native order (``weight.reshape(Cout, -1)``; for a conv weight ``[Cout, Cin/groups, kh, kw]``
that is ``K = Cin/groups * kh * kw`` with ``kw`` fastest). A **group** is ``m`` consecutive entries of
a row of that view (layout ``row``, the default). An N:M pattern keeps at most ``n`` non-zeros in
every group.

Layout ``channel`` groups along the input channels instead: a conv weight is viewed as
``[Cout, kh, kw, Cin/groups]`` and a group is ``m`` consecutive input channels at one ``(kh, kw)``,
the order that N:M GPU kernels use for implicit-GEMM convolutions. For 2-D weights both layouts agree.

A **block** is a tile of ``block_rows x block_groups`` groups: ``block_rows`` consecutive output rows
times ``block_groups`` consecutive groups along K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import Layout, NMPattern

__all__ = [
    "Layout",
    "NMPattern",
    "group_view",
    "ungroup",
    "nm_mask",
    "random_nm_mask",
    "is_nm",
    "group_counts",
    "BlockGrid",
    "block_grid",
    "to_blocks",
    "from_blocks",
]


def _check_groupable(shape: torch.Size, m: int, layout: Layout, what: str = "weight", n: int | None = None) -> None:
    """Raise ``ValueError`` naming the shape and the pattern (``n:m``, or ``M=m`` without ``n``) if the
    weight cannot be grouped by ``m``."""
    if len(shape) < 2:
        raise ValueError(f"{what} of shape {tuple(shape)} cannot be N:M: need at least 2 dims [Cout, ...]")
    target = f"N:M {n}:{m} (M={m})" if n is not None else f"N:M with M={m}"
    if layout is Layout.CHANNEL:
        if len(shape) != 4 and len(shape) != 2:
            raise ValueError(f"layout 'channel' needs a 2-D or 4-D weight, got {what} of shape {tuple(shape)}")
        cin = shape[1]
        if cin % m != 0:
            raise ValueError(
                f"{what} of shape {tuple(shape)} cannot be {target} in layout 'channel': "
                f"Cin/groups={cin} is not a multiple of {m}; use a pattern whose M divides Cin/groups, or keep the layer dense"
            )
        return
    k = 1
    for d in shape[1:]:
        k *= d
    if k % m != 0:
        raise ValueError(f"{what} of shape {tuple(shape)} cannot be {target}: K={k} is not a multiple of {m}; "
                         f"use a pattern whose M divides K, or keep the layer dense")


def group_view(t: torch.Tensor, m: int, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """View ``t[Cout, ...]`` as groups: returns ``[Cout, G, m]`` (G = K / m).

    For layout ``row`` this is a view; for ``channel`` on 4-D weights it is a permuted copy.
    Use :func:`ungroup` to go back to the original shape.
    """
    layout = Layout.parse(layout)
    _check_groupable(t.shape, m, layout)
    cout = t.shape[0]
    if layout is Layout.CHANNEL and t.dim() == 4:
        t = t.permute(0, 2, 3, 1)  # [Cout, kh, kw, Cin]: channels fastest
    return t.reshape(cout, -1, m)


def ungroup(groups: torch.Tensor, shape: torch.Size | tuple[int, ...], layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """Inverse of :func:`group_view`: ``[Cout, G, m]`` back to ``shape``."""
    layout = Layout.parse(layout)
    shape = tuple(shape)
    if layout is Layout.CHANNEL and len(shape) == 4:
        cout, cin, kh, kw = shape
        return groups.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """Boolean mask of ``scores``' shape keeping the ``n`` largest scores in every group of ``m``.

    Ties are broken by position (the earlier entry wins), so the result is deterministic.
    """
    NMPattern(n, m)  # validates
    layout = Layout.parse(layout)
    _check_groupable(scores.shape, m, layout, n=n)  # names the pattern, not only M
    groups = group_view(scores.detach(), m, layout)
    # A tiny position-dependent offset would change magnitudes; instead sort stably on the scores.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    return ungroup(keep, scores.shape, layout)


def random_nm_mask(
    shape: torch.Size | tuple[int, ...], n: int, m: int, generator: torch.Generator | None = None,
    layout: Layout | str = Layout.ROW,
) -> torch.Tensor:
    """A uniformly random N:M mask (exactly ``n`` per group)."""
    scores = torch.rand(tuple(shape), generator=generator)
    return nm_mask(scores, n, m, layout)


def group_counts(mask: torch.Tensor, m: int, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """Number of non-zeros in each group: ``[Cout, G]`` int64."""
    return group_view(mask != 0, m, layout).sum(dim=-1)


def is_nm(mask: torch.Tensor, n: int, m: int, layout: Layout | str = Layout.ROW, exact: bool = False) -> bool:
    """True when every group of ``m`` holds at most ``n`` non-zeros (exactly ``n`` with ``exact``)."""
    counts = group_counts(mask, m, layout)
    return bool((counts == n).all() if exact else (counts <= n).all())


@dataclass(frozen=True)
class BlockGrid:
    """How a grouped weight ``[Cout, G, m]`` tiles into blocks of ``block_rows x block_groups`` groups."""

    cout: int
    groups_per_row: int
    m: int
    block_rows: int
    block_groups: int

    @property
    def rows_of_blocks(self) -> int:
        return self.cout // self.block_rows

    @property
    def cols_of_blocks(self) -> int:
        return self.groups_per_row // self.block_groups

    @property
    def num_blocks(self) -> int:
        return self.rows_of_blocks * self.cols_of_blocks

    @property
    def groups_per_block(self) -> int:
        return self.block_rows * self.block_groups


def block_grid(shape: torch.Size | tuple[int, ...], m: int, block_rows: int = 1, block_groups: int = 1,
               layout: Layout | str = Layout.ROW, n: int | None = None) -> BlockGrid:
    """Validate and describe the block tiling of a weight of ``shape``.

    ``n`` (optional) only names the full N:M pattern in the error raised when K is not a multiple of ``m``.
    """
    layout = Layout.parse(layout)
    _check_groupable(torch.Size(shape), m, layout, n=n)
    cout = shape[0]
    k = 1
    for d in shape[1:]:
        k *= d
    g = k // m
    if block_rows < 1 or block_groups < 1 or cout % block_rows or g % block_groups:
        raise ValueError(
            f"weight of shape {tuple(shape)} ({cout} rows x {g} groups of {m}) cannot be tiled into blocks of "
            f"{block_rows} rows x {block_groups} groups: both must be >= 1 and divide the grid"
        )
    return BlockGrid(cout, g, m, block_rows, block_groups)


def to_blocks(t: torch.Tensor, grid: BlockGrid, layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """``t[Cout, ...]`` -> ``[num_blocks, groups_per_block, m]``; blocks in row-major order over the grid."""
    g = group_view(t, grid.m, layout)  # [Cout, G, m]
    g = g.reshape(grid.rows_of_blocks, grid.block_rows, grid.cols_of_blocks, grid.block_groups, grid.m)
    g = g.permute(0, 2, 1, 3, 4)  # [R, C, br, bg, m]
    return g.reshape(grid.num_blocks, grid.groups_per_block, grid.m)


def from_blocks(blocks: torch.Tensor, grid: BlockGrid, shape: torch.Size | tuple[int, ...],
                layout: Layout | str = Layout.ROW) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    b = blocks.reshape(grid.rows_of_blocks, grid.cols_of_blocks, grid.block_rows, grid.block_groups, grid.m)
    b = b.permute(0, 2, 1, 3, 4).reshape(grid.cout, grid.groups_per_row, grid.m)
    return ungroup(b, shape, layout)
