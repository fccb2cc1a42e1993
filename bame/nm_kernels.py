"""Sparse forward and input-gradient products of N:M layers, from the compressed forms of :mod:`bame.nm_compressed`.

Each :class:`SparseKernel` computes ``Y = op(X, W*m)`` and ``dX = op^T(dY, W*m)`` for a linear layer
(``[P, K] @ A^T``) or a groups=1 conv2d lowered to a matrix product over conv columns:

============  ==========================================  =============================================
kernel        product                                     conv columns
============  ==========================================  =============================================
``csr``       ``torch.sparse`` CSR @ dense (MKL on x86)   ``[K, B*L]`` (``_im2col_t``; col2im by ``fold``)
``bsr``       the same with 1x1-block BSR (MKL's BSR)     as ``csr``
``gather``    ELL gather-multiply-sum in torch ops        ``[B, K, L]`` (``F.unfold`` / ``F.fold``)
``compiled``  the same gather-multiply-sum, torch.compile  as ``gather``
``direct``    gather-multiply-sum over shifted input      none: a direct convolution (the input gradient
              windows, torch.compile                      of a strided conv on zero-interleaved ``dY``)
============  ==========================================  =============================================

``L`` is the number of output positions of one image, ``K = Cin*kh*kw``. For a 1x1 conv with stride 1
and no padding the columns are the input itself (a view for ``gather``/``compiled``). The batch-major
``[B, K, L]`` layout makes the ELL kernels' output ``[B, Cout, L]`` the conv's own layout (no copy);
CSR wants one ``[K, B*L]`` matrix, so its output is permuted back (one copy). ``direct`` reads the
padded input in place: each kept weight ``(c, i, j)`` selects the input window starting at its flat
offset, so inductor's loads stay contiguous along the output row (an ELL summed over an inner dimension,
or a window shifted by an index tensor, made it gather 16 scalars per vector instead).

Work: ``csr``/``bsr`` multiply-add each kept weight once per position (``|m| x positions``, the ideal
work); ``gather``/``compiled`` too for the forward, and ``ell_t.padding`` times that for the input
gradient (zero-valued padding entries); ``direct`` ``conv_t.padding`` times it for the input gradient
(times ``stride^2`` for a strided conv: the zeros interleaved into ``dY``). ``gather`` materialises the gathered columns in chunks of at
most :data:`GATHER_CHUNK_BYTES`.

Supported: float32 and float64 (``csr``/``bsr``: MKL has no half-precision CSR product), the CPU (the
only device this was measured on), conv stride / padding / dilation, groups=1. :func:`unsupported`
says why a call cannot run, so that a caller can fall back to the masked dense kernels.

:func:`nm_sparse_linear` / :func:`nm_sparse_conv2d` wrap a kernel in an autograd Function (forward and
input gradient by the kernel, weight gradient ``mask * dL/d(W*m)`` by the dense kernel), so that
exactness can be checked against plain autograd and with ``gradcheck``. Under autocast they compute in
float32 (``custom_fwd(cast_inputs=float32)``): the CSR product has no half precision on the CPU.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight
from torch.nn.modules.utils import _pair

from .kernels import _im2col_t  # the [K, B*L] conv columns of the SDDMM weight gradient
from .nm_compressed import NMIndex

__all__ = ["SparseKernel", "GATHER_CHUNK_BYTES", "COMPILED_SHAPES_LIMIT", "unsupported", "pack", "ell_matmul",
           "sparse_linear", "sparse_linear_input_grad", "conv_columns", "sparse_conv2d", "sparse_conv2d_input_grad",
           "nm_sparse_linear", "nm_sparse_conv2d"]


class SparseKernel(str, Enum):
    """Which product computes the forward / input gradient (see the module docstring)."""

    CSR = "csr"
    BSR = "bsr"
    GATHER = "gather"
    COMPILED = "compiled"
    DIRECT = "direct"

    @property
    def batch_major(self) -> bool:
        """Whether the kernel takes its dense operand as ``[B, K, L]`` (else ``[K, B*L]``)."""
        return self is not SparseKernel.CSR and self is not SparseKernel.BSR


GATHER_CHUNK_BYTES = 64 * 2 ** 20  # bound on the gathered [S, T, R, L] block that `gather` materialises
COMPILED_SHAPES_LIMIT = 1024  # specialisations (shape, dtype, conv args) a compiled kernel may hold (dynamo: 8)
_MKL_DTYPES = (torch.float32, torch.float64)


def unsupported(kernel: SparseKernel, dtype: torch.dtype, device: torch.device, groups: int = 1) -> Optional[str]:
    """Why ``kernel`` cannot compute this layer (``None`` when it can)."""
    if groups != 1:
        return f"groups={groups}: the sparse kernels lower groups=1 convs only"
    if device.type != "cpu":
        return f"device {device}: the sparse kernels were built and checked on the CPU only"
    if dtype not in _MKL_DTYPES:
        return f"dtype {dtype}: float32 and float64 only (MKL's CSR product has no half precision)"
    return None


def _check(kernel: SparseKernel, dtype: torch.dtype, device: torch.device, groups: int = 1) -> None:
    reason = unsupported(kernel, dtype, device, groups)
    if reason is not None:
        raise ValueError(f"sparse kernel {kernel.value!r} cannot run this layer: {reason}; use masked_dense")


def pack(index: NMIndex, weight: torch.Tensor, kernel: SparseKernel, transpose: bool = False):
    """The operand ``A = W*m`` (``transpose``: ``A^T``) of ``kernel``, re-packed from the current ``weight``.

    ``csr``/``bsr``: a sparse tensor; ``gather``/``compiled``/``direct``: ``(values, cols)``, both ``[T, R]``
    (``direct`` transposed: the flipped transposed conv's, :attr:`NMIndex.conv_t`).
    """
    if kernel is SparseKernel.DIRECT and transpose:
        return index.conv_t.pack(weight), index.conv_t.cols
    if kernel.batch_major:
        ell = index.ell_t if transpose else index.ell
        return ell.pack(weight), ell.cols
    return (index.csr_t if transpose else index.csr).pack(weight, blocked=kernel is SparseKernel.BSR)


def _ell_core(values: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``out[s, r, l] = sum_t values[t, r] * dense[s, cols[t, r], l]``: ``[S, R, L]`` from ``dense`` ``[S, C, L]``.

    The sum runs over the outer (entry) dimension, so the compiled loop vectorises along ``L``, where
    ``dense`` is contiguous (summing over an inner dimension made inductor gather 16 scalars per vector).
    """
    return (values[None, :, :, None] * dense[:, cols, :]).sum(1)


def _window_core(values: torch.Tensor, cols: torch.Tensor, table: torch.Tensor, xp: torch.Tensor, out_hw: tuple,
                 stride: tuple, span: int) -> torch.Tensor:
    """A direct convolution as one ELL product: ``out[b, r, h, w] = sum_t values[t, r] * xp[b].flat[table[cols[t, r]]
    + h*sh*Wp + w*sw]`` (``xp`` ``[B, C, Hp, Wp]`` padded, contiguous; ``table[k]`` the flat offset of weight
    column ``k``'s tap in the window, ``span`` one more than the largest): ``[B, R, Hout, Wout]``.

    ``xp`` is viewed as ``[B, span, Hout, Wout]`` windows, one starting at every flat offset, so the entry
    index selects a window and the loads stay affine (contiguous for stride 1) along the output row.
    """
    b, c, hp, wp = xp.shape
    windows = xp.as_strided((b, span, out_hw[0], out_hw[1]), (c * hp * wp, 1, stride[0] * wp, stride[1]))
    return (values[None, :, :, None, None] * windows[:, table[cols]]).sum(1)


def _direct_conv(operand, x: torch.Tensor, kernel_hw: tuple, stride: tuple, pads: tuple, dilation: tuple,
                 out_hw: tuple) -> torch.Tensor:
    """Conv of ``x`` padded by ``pads`` (``(left, right, top, bottom)``; negative crops) with the ELL ``operand``
    (columns in ``(channel, i, j)`` order of a ``[R, channels*kh*kw]`` weight), compiled."""
    values, cols = operand
    xp = F.pad(x, pads).contiguous()
    _, channels, hp, wp = xp.shape
    (kh, kw), (dh, dw) = kernel_hw, dilation
    k = torch.arange(channels * kh * kw, device=x.device)
    table = (k // (kh * kw)) * (hp * wp) + (k // kw % kh) * (dh * wp) + (k % kw) * dw
    span = (channels - 1) * hp * wp + (kh - 1) * dh * wp + (kw - 1) * dw + 1
    return _run_compiled(_window_core, values, cols, table, xp, tuple(out_hw), tuple(stride), span)


_COMPILED: dict = {}


def _compiled(fn):
    """``torch.compile(fn)`` (one specialisation per shape: ``dynamic=True`` was 1.2-1.5x slower), made once."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _run_compiled(fn, *args):
    try:
        with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES_LIMIT,
                                        accumulated_recompile_limit=COMPILED_SHAPES_LIMIT):
            return _compiled(fn)(*args)
    except Exception as e:  # inductor needs a working C++ compiler (and its headers) on this machine
        raise RuntimeError(f"torch.compile of the gather-multiply-sum failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); use kernel 'csr' or 'gather'") from e


def ell_matmul(values: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """:func:`_ell_core` (``[S, C, L]`` -> ``[S, R, L]``), compiled or in eager torch ops (chunked)."""
    if compiled:
        return _run_compiled(_ell_core, values, cols, dense.contiguous())
    s, _, length = dense.shape
    per_position = values.numel() * dense.element_size()  # bytes gathered per (s, l)
    step_l = max(1, min(length, GATHER_CHUNK_BYTES // per_position))
    step_s = max(1, GATHER_CHUNK_BYTES // (per_position * step_l))
    if step_s >= s and step_l >= length:
        return _ell_core(values, cols, dense)
    out = dense.new_empty(s, values.shape[1], length)
    for s0 in range(0, s, step_s):
        for l0 in range(0, length, step_l):
            out[s0:s0 + step_s, :, l0:l0 + step_l] = _ell_core(values, cols, dense[s0:s0 + step_s, :, l0:l0 + step_l])
    return out


def _product(kernel: SparseKernel, operand, dense: torch.Tensor) -> torch.Tensor:
    """``A @ dense`` by ``kernel``: ``dense`` ``[S, C, L]`` for the ELL kernels, ``[C, P]`` for CSR/BSR."""
    if kernel.batch_major:
        values, cols = operand
        return ell_matmul(values, cols, dense, compiled=kernel is not SparseKernel.GATHER)
    return operand @ dense


def sparse_linear(x: torch.Tensor, operand, kernel: SparseKernel) -> torch.Tensor:
    """``x @ A^T`` (``x`` ``[..., K]``, ``A`` ``[Cout, K]`` from :func:`pack`) -> ``[..., Cout]``."""
    x2 = x.reshape(-1, x.shape[-1])
    x_t = x2.t().contiguous()  # [K, P]: positions along the vectorised dimension
    y_t = _product(kernel, operand, x_t[None] if kernel.batch_major else x_t)
    return y_t.reshape(y_t.shape[-2], -1).t().reshape(*x.shape[:-1], -1)


def sparse_linear_input_grad(grad_out: torch.Tensor, operand_t, kernel: SparseKernel) -> torch.Tensor:
    """``grad_out @ A`` (``operand_t`` = ``A^T`` from ``pack(..., transpose=True)``) -> ``[..., K]``."""
    return sparse_linear(grad_out, operand_t, kernel)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _is_pointwise(kernel_hw, conv_args) -> bool:
    """A 1x1 conv with stride 1 and no padding: its columns are the input itself."""
    stride, padding, _, _ = conv_args
    return tuple(kernel_hw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def conv_columns(x: torch.Tensor, kernel_hw, conv_args, batch_major: bool) -> torch.Tensor:
    """``x`` ``[B, Cin, H, W]`` as conv columns: ``[B, K, L]`` (``batch_major``) or ``[K, B*L]``, K in weight order."""
    stride, padding, dilation, _ = conv_args
    if batch_major:
        if _is_pointwise(kernel_hw, conv_args):
            return x.reshape(x.shape[0], x.shape[1], -1)  # a view of a contiguous input
        return F.unfold(x, kernel_hw, dilation=dilation, padding=padding, stride=stride)
    return _im2col_t(x, tuple(kernel_hw), stride, padding, dilation)


def _fold(cols: torch.Tensor, x_shape, kernel_hw, conv_args) -> torch.Tensor:
    """Adjoint of :func:`conv_columns` (batch-major): sum ``[B, K, L]`` back into ``[B, Cin, H, W]``."""
    stride, padding, dilation, _ = conv_args
    if _is_pointwise(kernel_hw, conv_args):
        return cols.reshape(x_shape)
    return F.fold(cols, tuple(x_shape[2:]), kernel_hw, dilation=dilation, padding=padding, stride=stride)


def sparse_conv2d(x: torch.Tensor, operand, kernel: SparseKernel, weight_shape, conv_args,
                  columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, W*m)`` (no bias) for a groups=1 conv; ``operand`` = ``A`` from :func:`pack`; ``columns``:
    ``conv_columns(x, ..., kernel.batch_major)`` when the caller built them (to keep them), else made here."""
    cout, _, kh, kw = weight_shape
    stride, padding, dilation, _ = conv_args
    b, _, h, w = x.shape
    hout = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wout = _out_size(w, kw, stride[1], padding[1], dilation[1])
    if kernel is SparseKernel.DIRECT:
        pads = (padding[1], padding[1], padding[0], padding[0])
        return _direct_conv(operand, x, (kh, kw), stride, pads, dilation, (hout, wout))
    cols = conv_columns(x, (kh, kw), conv_args, kernel.batch_major) if columns is None else columns
    y = _product(kernel, operand, cols)  # [B, Cout, L] or [Cout, B*L]
    if kernel.batch_major:
        return y.view(b, cout, hout, wout)
    return y.view(cout, b, hout, wout).transpose(0, 1).contiguous()


def sparse_conv2d_input_grad(grad_out: torch.Tensor, operand_t, kernel: SparseKernel, x_shape, weight_shape,
                             conv_args) -> torch.Tensor:
    """``conv2d_input(x_shape, W*m, grad_out)`` for a groups=1 conv; ``operand_t`` = ``A^T``."""
    cout, _, kh, kw = weight_shape
    b = grad_out.shape[0]
    stride, padding, dilation, _ = conv_args
    if kernel is SparseKernel.DIRECT:  # a direct conv of grad_out (zero-interleaved if strided), flipped taps
        _, _, ho, wo = grad_out.shape
        if tuple(stride) != (1, 1):
            spread = grad_out.new_zeros(b, cout, (ho - 1) * stride[0] + 1, (wo - 1) * stride[1] + 1)
            spread[:, :, ::stride[0], ::stride[1]] = grad_out
            grad_out = spread
        pads = []
        for size, k, s, p, d in reversed(list(zip(x_shape[2:], (kh, kw), stride, padding, dilation))):
            rest = (size + 2 * p - d * (k - 1) - 1) % s  # input rows/cols the strided windows never reach
            pads += [d * (k - 1) - p, d * (k - 1) - p + rest]
        return _direct_conv(operand_t, grad_out, (kh, kw), (1, 1), tuple(pads), dilation, tuple(x_shape[2:]))
    if kernel.batch_major:
        cols = _product(kernel, operand_t, grad_out.reshape(b, cout, -1))  # [B, K, L]
    else:
        go_t = grad_out.transpose(0, 1).reshape(cout, -1)  # [Cout, B*L]
        cols = _product(kernel, operand_t, go_t).view(-1, b, go_t.shape[1] // b).transpose(0, 1)  # [B, K, L]
    return _fold(cols, x_shape, (kh, kw), conv_args)


class _SparseNMLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: float32, autocast off
    def forward(ctx, x, weight, bias, mask, index, kernel):
        ctx.save_for_backward(x, weight, mask)
        ctx.index, ctx.kernel, ctx.has_bias = index, kernel, bias is not None
        y = sparse_linear(x, pack(index, weight, kernel), kernel)
        return y if bias is None else y + bias

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        go2 = grad_out.reshape(-1, grad_out.shape[-1])  # [P, Cout]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_linear_input_grad(grad_out, pack(ctx.index, weight, ctx.kernel, transpose=True), ctx.kernel)
        if ctx.needs_input_grad[1]:
            grad_w = (go2.t() @ x.reshape(-1, x.shape[-1])) * mask
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = go2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class _SparseNMConv2d(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: float32, autocast off
    def forward(ctx, x, weight, bias, mask, index, kernel, conv_args):
        ctx.save_for_backward(x, weight, mask)
        ctx.index, ctx.kernel, ctx.conv_args, ctx.has_bias = index, kernel, conv_args, bias is not None
        y = sparse_conv2d(x, pack(index, weight, kernel), kernel, weight.shape, conv_args)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_conv2d_input_grad(grad_out, pack(ctx.index, weight, ctx.kernel, transpose=True),
                                              ctx.kernel, x.shape, weight.shape, ctx.conv_args)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight(x, weight.shape, grad_out, stride, padding, dilation, groups) * mask
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _checked_index(index: NMIndex, weight: torch.Tensor, mask: torch.Tensor) -> None:
    if tuple(index.weight_shape) != tuple(weight.shape) or mask.shape != weight.shape:
        raise ValueError(f"index of shape {index.weight_shape} / mask of shape {tuple(mask.shape)} do not match the "
                         f"weight's {tuple(weight.shape)}: build NMIndex from this layer's mask")


def nm_sparse_linear(x, weight, bias, mask, index: NMIndex, kernel: SparseKernel | str) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` with forward and input gradient by ``kernel`` (``index`` from ``mask``)."""
    kernel = SparseKernel(kernel)
    _check(kernel, weight.dtype, weight.device)
    _checked_index(index, weight, mask)
    return _SparseNMLinear.apply(x.to(weight.dtype), weight, bias, mask, index, kernel)


def nm_sparse_conv2d(x, weight, bias, mask, index: NMIndex, kernel: SparseKernel | str, stride=1, padding=0,
                     dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, ...)`` with forward and input gradient by ``kernel``."""
    kernel = SparseKernel(kernel)
    _check(kernel, weight.dtype, weight.device, int(groups))
    _checked_index(index, weight, mask)
    if isinstance(padding, str):
        raise ValueError(f"nm_sparse_conv2d needs numeric padding, got {padding!r}: pass the padding as integers")
    conv_args = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _SparseNMConv2d.apply(x.to(weight.dtype), weight, bias, mask, index, kernel, conv_args)
