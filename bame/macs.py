"""Forward MACs of one conv or linear call as pure functions of the shapes (fvcore style), the closed forms
the FLOPs ledger's counts are tested against. One MAC is one multiply-accumulate; FLOPs = 2 x MACs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

__all__ = ["conv_output_hw", "conv2d_macs", "linear_macs"]


def conv_output_hw(hw: Sequence[int], kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """Output ``(H, W)`` of a 2-D convolution (PyTorch's floor rule) with numeric padding."""
    k, s, p, d = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))  # type: ignore


def conv2d_macs(input_shape: Sequence[int], weight_shape: Sequence[int], stride=1, padding=0, dilation=1,
                groups: int = 1, nnz: Optional[int] = None) -> int:
    """Forward MACs of ``conv2d(x[B, Cin, H, W], w[Cout, Cin/groups, kh, kw])``.

    Every output element of every output channel uses the ``Cin/groups * kh * kw`` weights of its
    row, so the count is ``nnz * B * Hout * Wout`` with ``nnz = weight.numel()`` for a dense weight
    (pass the non-zeros of ``W*m`` for a sparse one). The input gradient costs the same, and so does a
    weight gradient computed at ``nnz`` positions.
    """
    b, cin, h, w = input_shape
    cout, cin_g, kh, kw = weight_shape
    if cin != cin_g * groups:
        raise ValueError(f"conv2d_macs: input channels {cin} != weight's {cin_g} x groups {groups}")
    hout, wout = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    n = cout * cin_g * kh * kw if nnz is None else int(nnz)
    return n * b * hout * wout


def linear_macs(input_shape: Sequence[int], weight_shape: Sequence[int], nnz: Optional[int] = None) -> int:
    """Forward MACs of ``linear(x[..., K], w[Cout, K])``: ``nnz * prod(leading dims of x)``."""
    cout, k = weight_shape
    if input_shape[-1] != k:
        raise ValueError(f"linear_macs: input features {input_shape[-1]} != weight's {k}")
    rows = math.prod(input_shape[:-1])
    return (cout * k if nnz is None else int(nnz)) * rows


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)  # type: ignore
