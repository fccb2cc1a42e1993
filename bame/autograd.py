"""Custom autograd for N:M sparse conv2d / linear with an explicit backward mode.

Every mode runs the forward and the input gradient with the masked weight ``W_eff = W * mask``, by the
masked dense kernels or, where ``sparse`` (:class:`~bame.forward_kernels.SparseKernels`) picks one, a sparse
kernel on the compressed form of ``W_eff`` (:mod:`bame.forward_kernels`). The modes differ only in the
weight gradient (``g_eff = dL/dW_eff``, the gradient of the masked weight):

=========  ================================================  ====================================
mode       weight gradient returned                           weight-gradient work (ideal MACs)
=========  ================================================  ====================================
DENSE      ``mask * g_eff`` (plain autograd of op(x, W*m))    every weight x positions
STE        ``g_eff`` (straight through the mask)               every weight x positions
SRSTE      ``g_eff + decay * (1 - mask) * W``                 every weight x positions
SPARSE     ``(mask | grad_mask) * g_eff``, zero elsewhere     ``|mask | grad_mask|`` x positions
=========  ================================================  ====================================

``positions`` is ``batch * output spatial positions`` (``batch`` rows for linear). An optional
``observer`` receives one :class:`PhaseCost` per phase that really ran; the FLOPs ledger uses it.

An optional ``backward_mask`` (Bi-Mask's) replaces ``mask`` in the input gradient only: it is then
``dL/dY`` through ``W * backward_mask`` (counted at ``nnz(backward_mask)``), while the forward and the weight
gradient of every mode stay as above.
Conv gradients use :func:`torch.nn.grad.conv2d_input` / :func:`torch.nn.grad.conv2d_weight`.

``SPARSE`` may compute the weight gradient only at the needed positions (``kernel`` set to
:class:`~bame.kernels.WeightGradKernel` ``GATHER``): then the executed work equals the ideal work. Where a
conv's forward ran ``csr``/``bsr``, that SDDMM runs on the conv columns the forward built and kept
(``ctx`` holds them until the backward; their cost in memory: :mod:`bame.forward_kernels`); the im2col is not
a multiply-add, so the work counted is the SDDMM's either way.

Host syncs: the non-zero counts the observer needs, the needed-position union ``mask | grad_mask`` and
GATHER's index plan are cached per mask version (``bame.kernels``, with the GATHER and AUTO kernels), so a
step whose masks did not change reads nothing back from the device. A new count stays on the device for an
observer that takes :class:`~bame.kernels.LazyMacs` (the FLOPs ledger reads them all at the end of the step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from torch.nn.grad import conv2d_input, conv2d_weight

from . import contract
from .forward_kernels import (FORWARD, INPUT_GRAD, WEIGHT_GRAD, SparseKernels, builds_shared_columns, choose,
                              conv_columns_kept, conv_forward, conv_input_grad, executed_macs, linear_forward,
                              linear_input_grad, nm_index)
from .kernels import (Count, LazyMacs, WeightGradKernel, auto_decision, gather_conv_weight_grad,
                      gather_linear_weight_grad, gather_plan, mask_count, needed_count, needed_positions,
                      use_gather)
from .nm_kernels import SparseKernel

__all__ = ["Backward", "Phase", "PhaseCost", "Observer", "WeightGradKernel", "nm_conv2d", "nm_linear"]


class Backward(str, Enum):
    """What the weight gradient of a sparse layer is (see the module docstring)."""

    DENSE = "dense"
    STE = "ste"
    SRSTE = "srste"
    SPARSE = "sparse"

    @classmethod
    def parse(cls, value: Backward | str) -> Backward:
        if isinstance(value, Backward):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown backward mode {value!r}: use one of {[v.value for v in cls]}") from None


class Phase(str, Enum):
    """A phase of a layer call, named as the FLOPs ledger and flops.csv name it (bame.contract)."""

    FORWARD = contract.FORWARD
    INPUT_GRAD = contract.INPUT_GRAD
    WEIGHT_GRAD = contract.WEIGHT_GRAD


@dataclass(frozen=True)
class PhaseCost:
    """Work of one phase of one layer call, in multiply-accumulates (MACs; FLOPs = 2 x MACs)."""

    phase: Phase
    # non-zero work: weights actually used x positions (a LazyMacs for an observer with lazy_counts)
    ideal_macs: int
    executed_macs: int  # what the kernel run on this machine really computed (LazyMacs as ideal_macs)
    positions: int  # batch * output spatial positions


Observer = Callable[[PhaseCost], None]
_MASK_MOVES = (Backward.STE, Backward.SRSTE)  # modes whose methods change the mask every step (auto keeps masked dense)


def _macs(count: int | Count, positions: int, observer) -> int | LazyMacs:
    """``count * positions`` as an int, or lazily for an observer that takes lazy counts."""
    if isinstance(count, int):
        return count * positions
    if count.value is None and getattr(observer, "lazy_counts", False):
        return LazyMacs(count, positions)
    return int(count) * positions


def _finish_weight_grad(mode: Backward, g_eff: torch.Tensor, weight, mask, needed, srste_decay: float):
    """Turn ``g_eff = dL/dW_eff`` into the gradient this mode returns for ``W``."""
    if mask is None:
        return g_eff
    if mode is Backward.DENSE:
        return g_eff * mask
    if mode is Backward.STE:
        return g_eff
    if mode is Backward.SRSTE:
        return g_eff + srste_decay * (~mask) * weight
    return g_eff * needed


def _weight_grad(ctx, weight, mask, grad_mask, positions: int, shape_key: tuple,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]],
                 dense_g_eff: Callable[[], torch.Tensor], shared_columns: bool = False) -> torch.Tensor:
    """The weight gradient of ``ctx.mode``, by the kernel ``ctx.kernel`` picks, and its cost report.

    ``gather(needed)`` computes it only at the needed positions (None where that kernel cannot run), on
    conv columns the forward kept when ``shared_columns``; ``dense_g_eff()`` computes ``dL/dW_eff`` at every
    position.
    """
    mode, observer = ctx.mode, ctx.observer
    needed = needed_positions(mask, grad_mask) if mode is Backward.SPARSE and mask is not None else None

    def gather_fn() -> torch.Tensor:
        return gather(needed).to(weight.dtype)

    def dense_fn() -> torch.Tensor:
        return _finish_weight_grad(mode, dense_g_eff().to(weight.dtype), weight, mask, needed, ctx.srste_decay)

    gathered = needed is not None and gather is not None and use_gather(
        ctx.kernel, shape_key, mask, grad_mask, needed, gather_fn, dense_fn, shared_columns)
    grad_w = gather_fn() if gathered else dense_fn()
    if ctx.sparse is not None and ctx.kernel is not WeightGradKernel.MASKED_DENSE:
        ctx.sparse.record[WEIGHT_GRAD] = _weight_grad_record(ctx.kernel, mode, gathered, gather is None,
                                                             shared_columns)
    if observer is not None:  # the SDDMM's work either way: building the columns multiplies nothing
        ideal = weight.numel() * positions if needed is None else \
            _macs(needed_count(mask, grad_mask, needed), positions, observer)
        observer(PhaseCost(Phase.WEIGHT_GRAD, ideal, ideal if gathered else weight.numel() * positions,
                           positions))
    return grad_w


def _weight_grad_record(kernel: WeightGradKernel, mode: Backward, gathered: bool, no_gather: bool,
                        shared_columns: bool) -> str:
    """What ran a weight gradient set to ``gather``/``auto``: ``gather``, ``gather (shared columns)`` or
    ``masked_dense``, with ``auto`` when timed, or why the SDDMM could not run."""
    if mode is not Backward.SPARSE:
        return f"masked_dense (backward {mode.value}: the SDDMM serves the sparse backward only)"
    if no_gather:
        return "masked_dense (groups != 1: the SDDMM lowers groups=1 convs only)"
    notes = (["shared columns"] if gathered and shared_columns else []) + (
        ["auto"] if kernel is WeightGradKernel.AUTO else [])
    name = WeightGradKernel.GATHER.value if gathered else WeightGradKernel.MASKED_DENSE.value
    return name + (f" ({', '.join(notes)})" if notes else "")


def _forward_cost(kernel, macs, weight, positions: int, index_fn) -> PhaseCost:
    """The forward's cost: ``macs`` ideal; executed by ``kernel`` (masked dense: every weight)."""
    return PhaseCost(Phase.FORWARD, macs, _executed(kernel, Phase.FORWARD, macs, weight, positions, 0, index_fn),
                     positions)


def _executed(kernel, phase: Phase, ideal, weight, positions: int, input_positions: int, index_fn):
    if kernel is None:
        return weight.numel() * positions
    if kernel in (SparseKernel.CSR, SparseKernel.BSR):
        return ideal  # the kept weights once per position
    return executed_macs(kernel, phase.value, index_fn(), positions, input_positions)


class _NMLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, mask, grad_mask, mode, srste_decay, kernel, observer, sparse, backward_mask):
        shape_key = ("linear", tuple(weight.shape), tuple(x.shape), str(x.dtype), str(x.device))
        fwd = choose(FORWARD, sparse, mode in _MASK_MOVES, shape_key, weight, mask,
                     lambda k: linear_forward(k, x, weight, mask, bias, sparse))
        out = linear_forward(fwd, x, weight, mask, bias, sparse)
        ctx.save_for_backward(x, weight, mask, grad_mask, backward_mask)
        ctx.mode, ctx.srste_decay, ctx.kernel, ctx.observer, ctx.sparse = mode, srste_decay, kernel, observer, sparse
        ctx.has_bias = bias is not None
        if observer is not None:
            positions = x.numel() // x.shape[-1]
            observer(_forward_cost(fwd, _macs(mask_count(mask, weight), positions, observer), weight, positions,
                                   lambda: nm_index(mask, sparse)))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, mask, grad_mask, backward_mask = ctx.saved_tensors
        observer, sparse = ctx.observer, ctx.sparse
        go2 = grad_out.reshape(-1, grad_out.shape[-1])  # [positions, Cout]
        x2 = x.reshape(-1, x.shape[-1])  # [positions, K]
        positions = go2.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and backward_mask is not None:
            w_in, in_mask = weight * backward_mask, backward_mask  # a layer's own backward mask (Bi-Mask)
            grad_x = (go2 @ w_in.to(go2.dtype)).reshape(x.shape)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _macs(mask_count(in_mask, weight), positions, observer),
                                   weight.numel() * positions, positions))
        elif ctx.needs_input_grad[0]:
            w_eff = weight if mask is None else weight * mask
            shape_key = ("linear", tuple(weight.shape), tuple(grad_out.shape), str(grad_out.dtype), str(x.device))
            ig = choose(INPUT_GRAD, sparse, ctx.mode in _MASK_MOVES, shape_key, weight, mask,
                        lambda k: linear_input_grad(k, grad_out, weight, mask, w_eff, sparse))
            grad_x = linear_input_grad(ig, grad_out, weight, mask, w_eff, sparse).reshape(x.shape)
            if observer is not None:
                ideal = _macs(mask_count(mask, weight), positions, observer)
                observer(PhaseCost(Phase.INPUT_GRAD, ideal, _executed(ig, Phase.INPUT_GRAD, ideal, weight, positions,
                                                                      0, lambda: nm_index(mask, sparse)), positions))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(
                ctx, weight, mask, grad_mask, positions,
                ("linear", tuple(weight.shape), tuple(x2.shape), str(go2.dtype)),
                lambda needed: gather_linear_weight_grad(x2, go2, gather_plan(mask, grad_mask, needed)),
                lambda: go2.t() @ x2.to(go2.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = go2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class _NMConv2d(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, mask, grad_mask, conv_args, mode, srste_decay, kernel, observer, sparse,
                backward_mask):
        stride, padding, dilation, groups = conv_args
        hout, wout = _conv_out_hw(x.shape, weight.shape, conv_args)
        shape_key = ("conv", tuple(weight.shape), tuple(x.shape), conv_args, str(x.dtype), str(x.device))
        fwd = choose(FORWARD, sparse, mode in _MASK_MOVES, shape_key, weight, mask,
                     lambda k: conv_forward(k, x, weight, mask, bias, conv_args, sparse), conv_args, wout)
        columns = None  # [K, B*L], kept for the weight gradient's SDDMM where it may run
        if builds_shared_columns(fwd) and ctx.needs_input_grad[1] and _sddmm_may_run(
                mode, kernel, mask, grad_mask, _conv_weight_grad_key(weight, x, conv_args, weight.dtype)):
            columns = conv_columns_kept(x, weight, conv_args)
        out = conv_forward(fwd, x, weight, mask, bias, conv_args, sparse, columns)
        ctx.save_for_backward(x, weight, mask, grad_mask, backward_mask, columns)
        ctx.conv_args, ctx.mode, ctx.srste_decay, ctx.kernel, ctx.observer, ctx.sparse = (
            conv_args, mode, srste_decay, kernel, observer, sparse)
        ctx.has_bias = bias is not None
        if observer is not None:
            # Each output position of each output channel uses Cin/groups*kh*kw weights of its row.
            positions = out.shape[0] * out.shape[2] * out.shape[3]
            observer(_forward_cost(fwd, _macs(mask_count(mask, weight), positions, observer), weight, positions,
                                   lambda: nm_index(mask, sparse)))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, mask, grad_mask, backward_mask, columns = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        observer, sparse = ctx.observer, ctx.sparse
        positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and backward_mask is not None:
            w_in, in_mask = weight * backward_mask, backward_mask  # a layer's own backward mask (Bi-Mask)
            grad_x = conv2d_input(x.shape, w_in.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _macs(mask_count(in_mask, weight), positions, observer),
                                   weight.numel() * positions, positions))
        elif ctx.needs_input_grad[0]:
            w_eff = weight if mask is None else weight * mask
            shape_key = ("conv", tuple(weight.shape), tuple(x.shape), ctx.conv_args, str(grad_out.dtype),
                         str(x.device))
            ig = choose(INPUT_GRAD, sparse, ctx.mode in _MASK_MOVES, shape_key, weight, mask,
                        lambda k: conv_input_grad(k, grad_out, x.shape, weight, mask, w_eff, ctx.conv_args, sparse),
                        ctx.conv_args, x.shape[3])
            grad_x = conv_input_grad(ig, grad_out, x.shape, weight, mask, w_eff, ctx.conv_args, sparse)
            if observer is not None:
                ideal = _macs(mask_count(mask, weight), positions, observer)
                input_positions = x.shape[0] * x.shape[2] * x.shape[3]
                observer(PhaseCost(Phase.INPUT_GRAD, ideal, _executed(
                    ig, Phase.INPUT_GRAD, ideal, weight, positions, input_positions, lambda: nm_index(mask, sparse)),
                    positions))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(
                ctx, weight, mask, grad_mask, positions,
                _conv_weight_grad_key(weight, x, ctx.conv_args, grad_out.dtype),
                None if groups != 1 else lambda needed: gather_conv_weight_grad(
                    x, grad_out, gather_plan(mask, grad_mask, needed.reshape(needed.shape[0], -1)), weight.shape,
                    ctx.conv_args, columns),
                lambda: conv2d_weight(x.to(grad_out.dtype), weight.shape, grad_out, stride, padding, dilation, groups),
                columns is not None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _conv_weight_grad_key(weight, x, conv_args, grad_dtype: torch.dtype) -> tuple:
    """The layer shape part of a conv weight gradient's ``AUTO`` key (:func:`~bame.kernels.use_gather`)."""
    return "conv", tuple(weight.shape), tuple(x.shape), conv_args, str(grad_dtype)


def _sddmm_may_run(mode: Backward, kernel: WeightGradKernel, mask, grad_mask, shape_key: tuple) -> bool:
    """Whether the backward may run the SDDMM weight gradient on kept conv columns: mode ``SPARSE`` with
    ``GATHER``, or ``AUTO`` unless it already chose masked dense for them (then keeping them costs memory for
    nothing). ``shape_key``'s dtype is the output's, the sparse kernels' (that of the gradient to come)."""
    if mode is not Backward.SPARSE or mask is None or kernel is WeightGradKernel.MASKED_DENSE:
        return False
    if kernel is WeightGradKernel.GATHER:
        return True
    return auto_decision(shape_key, mask, grad_mask, needed_positions(mask, grad_mask), shared_columns=True) \
        is not False


def _conv_out_hw(x_shape, weight_shape, conv_args) -> tuple[int, int]:
    stride, padding, dilation, _ = conv_args
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation))


def nm_linear(x, weight, bias=None, mask=None, grad_mask=None, mode: Backward = Backward.SPARSE,
              srste_decay: float = 0.0, kernel: WeightGradKernel = WeightGradKernel.MASKED_DENSE,
              observer: Optional[Observer] = None, sparse: Optional[SparseKernels] = None,
              backward_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` whose weight gradient follows ``mode``; ``sparse`` picks the forward and
    input-gradient kernels (``None``: masked dense); with ``backward_mask`` the input gradient goes through
    ``weight * backward_mask`` instead (masked dense)."""
    return _NMLinear.apply(x, weight, bias, mask, grad_mask, Backward.parse(mode), float(srste_decay),
                           WeightGradKernel(kernel), observer, sparse, backward_mask)


def nm_conv2d(x, weight, bias=None, mask=None, grad_mask=None, stride=1, padding=0, dilation=1, groups=1,
              mode: Backward = Backward.SPARSE, srste_decay: float = 0.0,
              kernel: WeightGradKernel = WeightGradKernel.MASKED_DENSE,
              observer: Optional[Observer] = None, sparse: Optional[SparseKernels] = None,
              backward_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, ...)`` whose weight gradient follows ``mode``; ``sparse`` and
    ``backward_mask`` as in :func:`nm_linear`."""
    if isinstance(padding, str):
        raise ValueError(f"nm_conv2d needs numeric padding, got {padding!r}: pass the padding as integers")
    conv_args = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _NMConv2d.apply(x, weight, bias, mask, grad_mask, conv_args, Backward.parse(mode), float(srste_decay),
                           WeightGradKernel(kernel), observer, sparse, backward_mask)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)
