"""The compressed N:M weight: kept values plus uint8 in-group indices (what ``bame export`` writes per layer).

A weight ``W[Cout, ...]`` with an N:M mask is grouped by the package's one convention
(:func:`bame.nm.group_view`: ``[Cout, G, M]``, layout ``row`` or ``channel``) and stored as

- ``values``  ``[Cout, G, N]`` in the weight's dtype: the kept weights of each group;
- ``indices`` ``[Cout, G, N]`` uint8: their positions ``0..M-1`` inside the group, strictly ascending.

A mask may keep *fewer* than N weights in a group ("at most N"). Such a group is padded to N slots
with the smallest positions the mask does not keep, each with value 0; the slot list stays sorted
and duplicate-free, so decompression is one ``scatter`` and ``decompress(compress(W, m)) == W * m``
exactly (pruned positions come back as +0). Padding slots cannot be told apart from kept weights
whose value is exactly 0; both decompress to 0, which is all the forward pass sees.

Size: ``Cout * G * N * (itemsize + 1)`` bytes against ``Cout * G * M * itemsize`` dense; e.g. 2:4 in
float16 is 0.75x dense, 1:16 in float32 is 5/64 of dense (one uint8 index per value; not bit-packed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .nm import Layout, NMPattern, group_counts, group_view, ungroup

__all__ = ["NMCompressed", "compress", "decompress", "dense_nbytes", "compressed_nbytes", "compression_ratio"]

_MAX_M = 256  # in-group positions are stored as uint8


@dataclass(frozen=True)
class NMCompressed:
    """One N:M weight in compressed form (see the module docstring for the exact format)."""

    values: torch.Tensor  # [Cout, G, N], the weight's dtype
    indices: torch.Tensor  # [Cout, G, N] uint8, ascending positions 0..M-1 within each group
    shape: tuple[int, ...]  # the dense weight's shape
    pattern: NMPattern
    layout: Layout

    @property
    def nbytes(self) -> int:
        return compressed_nbytes(self)

    @property
    def dense_nbytes(self) -> int:
        return dense_nbytes(self)

    @property
    def ratio(self) -> float:
        return compression_ratio(self)

    def to_dict(self) -> dict:
        """Plain entry for the export file (only tensors, lists and strings)."""
        return dict(values=self.values, indices=self.indices, shape=list(self.shape),
                    pattern=str(self.pattern), layout=self.layout.value)

    @classmethod
    def from_dict(cls, entry: Mapping, name: str = "<layer>") -> NMCompressed:
        """Inverse of :meth:`to_dict`; checks that the parts fit together."""
        try:
            c = cls(entry["values"], entry["indices"], tuple(int(d) for d in entry["shape"]),
                    NMPattern.parse(entry["pattern"]), Layout.parse(entry["layout"]))
        except KeyError as err:
            raise ValueError(f"export entry for layer {name!r} lacks key {err.args[0]!r}") from None
        _check_compressed(c, name)
        return c


def _check_compressed(c: NMCompressed, name: str) -> None:
    cout = c.shape[0]
    k = math.prod(c.shape[1:])
    want = (cout, k // c.pattern.m, c.pattern.n)
    if tuple(c.values.shape) != want or tuple(c.indices.shape) != want or c.indices.dtype != torch.uint8:
        raise ValueError(
            f"export entry for layer {name!r} (weight {c.shape}, pattern {c.pattern}): expected values and "
            f"uint8 indices of shape {want}, got {tuple(c.values.shape)} and {tuple(c.indices.shape)} "
            f"{c.indices.dtype}")


def compress(weight: torch.Tensor, mask: torch.Tensor, pattern: NMPattern | str,
             layout: Layout | str = Layout.ROW) -> NMCompressed:
    """Compress ``weight * mask`` into N:M values + uint8 in-group indices.

    ``mask`` (bool or 0/1, the weight's shape) must keep at most N weights in every group of M;
    otherwise a ``ValueError`` names the shape, the pattern and how many groups break it.
    """
    pattern = NMPattern.parse(pattern)
    layout = Layout.parse(layout)
    n, m = pattern.n, pattern.m
    shape = tuple(weight.shape)
    if tuple(mask.shape) != shape:
        raise ValueError(f"cannot compress weight of shape {shape} with pattern {pattern}: "
                         f"mask shape {tuple(mask.shape)} differs")
    if m > _MAX_M:
        raise ValueError(f"cannot compress weight of shape {shape} with pattern {pattern}: "
                         f"M={m} > {_MAX_M} does not fit uint8 indices")
    keep = mask.detach() != 0
    try:
        counts = group_counts(keep, m, layout)  # [Cout, G]; raises if K is not a multiple of M
    except ValueError as err:
        raise ValueError(f"cannot compress with pattern {pattern}: {err}") from None
    bad = counts > n
    if bool(bad.any()):
        raise ValueError(
            f"mask of weight of shape {shape} is not {pattern} in layout {layout.value}: "
            f"{int(bad.sum())} of {counts.numel()} groups keep more than {n} "
            f"(up to {int(counts.max())} of {m})")
    gk = group_view(keep, m, layout)  # [Cout, G, M] bool
    gw = group_view(weight.detach(), m, layout)  # [Cout, G, M]
    # Kept positions sort first (key = position), unused after (key = M + position); the first N
    # are the kept ones plus, for groups keeping fewer than N, the smallest unused positions.
    pos = torch.arange(m, device=weight.device)
    key = (~gk).to(torch.int64) * m + pos
    slots = torch.sort(torch.sort(key, dim=-1).indices[..., :n], dim=-1).values  # [Cout, G, N] ascending
    values = torch.where(gk.gather(-1, slots), gw.gather(-1, slots), torch.zeros((), dtype=weight.dtype,
                                                                                 device=weight.device))
    return NMCompressed(values.contiguous(), slots.to(torch.uint8).contiguous(), shape, pattern, layout)


def decompress(c: NMCompressed) -> torch.Tensor:
    """The dense masked weight ``W * mask`` of ``c.shape`` (pruned positions are +0)."""
    cout = c.shape[0]
    groups = torch.zeros(cout, c.values.shape[1], c.pattern.m, dtype=c.values.dtype, device=c.values.device)
    groups.scatter_(-1, c.indices.long(), c.values)  # slots are distinct, so this is exact
    return ungroup(groups, c.shape, c.layout)


def dense_nbytes(c: NMCompressed) -> int:
    """Bytes of the dense weight ``c`` stands for."""
    return math.prod(c.shape) * c.values.element_size()


def compressed_nbytes(c: NMCompressed) -> int:
    """Bytes of values plus indices (one uint8 per kept value)."""
    return c.values.numel() * c.values.element_size() + c.indices.numel() * c.indices.element_size()


def compression_ratio(c: NMCompressed) -> float:
    """Dense bytes / compressed bytes (> 1 means smaller); e.g. 1.6 for 2:4 float32."""
    return dense_nbytes(c) / compressed_nbytes(c)
