"""Custom autograd for N:M sparse conv2d / linear with an explicit backward mode.

Every mode runs the forward and the input gradient with the masked weight ``W_eff = W * mask``.
They differ only in the weight gradient (``g_eff = dL/dW_eff``, the gradient of the masked weight):

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
Conv gradients use :func:`torch.nn.grad.conv2d_input` / :func:`torch.nn.grad.conv2d_weight`.

``SPARSE`` may compute the weight gradient only at the needed positions (``sparse_weight_grad``
set to :class:`WeightGradKernel` ``GATHER``): then the executed work equals the ideal work.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

__all__ = ["Backward", "Phase", "PhaseCost", "WeightGradKernel", "nm_conv2d", "nm_linear"]


class Backward(str, Enum):
    """What the weight gradient of a sparse layer is (see the module docstring)."""

    DENSE = "dense"
    STE = "ste"
    SRSTE = "srste"
    SPARSE = "sparse"

    @classmethod
    def parse(cls, value: "Backward | str") -> "Backward":
        if isinstance(value, Backward):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown backward mode {value!r}: use one of {[v.value for v in cls]}") from None


class WeightGradKernel(str, Enum):
    """How ``SPARSE`` mode computes the weight gradient."""

    MASKED_DENSE = "masked_dense"  # dense kernel, then multiply by (mask | grad_mask)
    GATHER = "gather"  # only the needed positions (executed work == ideal work)


class Phase(str, Enum):
    FORWARD = "forward"
    INPUT_GRAD = "input_grad"
    WEIGHT_GRAD = "weight_grad"


@dataclass(frozen=True)
class PhaseCost:
    """Work of one phase of one layer call, in multiply-accumulates (MACs; FLOPs = 2 x MACs)."""

    phase: Phase
    ideal_macs: int  # non-zero work: weights actually used x positions
    executed_macs: int  # what the kernel run on this machine really computed
    positions: int  # batch * output spatial positions


Observer = Callable[[PhaseCost], None]


def _count(mask: Optional[torch.Tensor], like: torch.Tensor) -> int:
    return like.numel() if mask is None else int(mask.count_nonzero())


def _weight_grad_positions(mode: Backward, mask, grad_mask) -> Optional[torch.Tensor]:
    """Positions where the weight gradient is needed; ``None`` means every position."""
    if mode is not Backward.SPARSE or mask is None:
        return None
    return mask if grad_mask is None else (mask | grad_mask)


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


class _NMLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, mask, grad_mask, mode, srste_decay, kernel, observer):
        w_eff = weight if mask is None else weight * mask
        ctx.save_for_backward(x, weight, w_eff, mask, grad_mask)
        ctx.mode, ctx.srste_decay, ctx.kernel, ctx.observer = mode, srste_decay, kernel, observer
        ctx.has_bias = bias is not None
        out = F.linear(x, w_eff, bias)
        if observer is not None:
            positions = x.numel() // x.shape[-1]
            observer(PhaseCost(Phase.FORWARD, _count(mask, weight) * positions, weight.numel() * positions,
                               positions))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, w_eff, mask, grad_mask = ctx.saved_tensors
        mode, observer = ctx.mode, ctx.observer
        go2 = grad_out.reshape(-1, grad_out.shape[-1])  # [positions, Cout]
        x2 = x.reshape(-1, x.shape[-1])  # [positions, K]
        positions = go2.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (go2 @ w_eff.to(go2.dtype)).reshape(x.shape)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _count(mask, weight) * positions,
                                   weight.numel() * positions, positions))
        if ctx.needs_input_grad[1]:
            needed = _weight_grad_positions(mode, mask, grad_mask)
            if needed is not None and ctx.kernel is WeightGradKernel.GATHER:
                grad_w = _gather_linear_weight_grad(x2, go2, needed).to(weight.dtype)
                executed = int(needed.count_nonzero()) * positions
            else:
                g_eff = (go2.t() @ x2.to(go2.dtype)).to(weight.dtype)
                grad_w = _finish_weight_grad(mode, g_eff, weight, mask, needed, ctx.srste_decay)
                executed = weight.numel() * positions
            if observer is not None:
                ideal = weight.numel() * positions if needed is None else int(needed.count_nonzero()) * positions
                observer(PhaseCost(Phase.WEIGHT_GRAD, ideal, executed, positions))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = go2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _gather_linear_weight_grad(x2: torch.Tensor, go2: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """``(go2^T @ x2)`` evaluated only where ``needed`` is True; zero elsewhere.

    Rows are padded to the largest per-row count so the work is one batched matmul:
    ``[Cout, 1, P] @ [Cout, P, kmax] -> [Cout, kmax]``.
    """
    cout, k = needed.shape
    counts = needed.sum(1)
    kmax = int(counts.max()) if cout else 0
    out = torch.zeros(cout, k, dtype=go2.dtype, device=go2.device)
    if kmax == 0:
        return out
    # Column indices of the needed entries, padded with column 0 (their results are dropped).
    order = torch.sort(needed.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=needed.device).unsqueeze(0) < counts.unsqueeze(1)  # [Cout, kmax]
    cols = torch.where(valid, order, torch.zeros_like(order))
    x_sel = x2.t()[cols.reshape(-1)].reshape(cout, kmax, -1)  # [Cout, kmax, P]
    vals = torch.bmm(x_sel.to(go2.dtype), go2.t().unsqueeze(-1)).squeeze(-1)  # [Cout, kmax]
    # scatter_add: padded slots point at column 0 and add exact zeros there.
    out.scatter_add_(1, cols, torch.where(valid, vals, torch.zeros_like(vals)))
    return out


class _NMConv2d(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, mask, grad_mask, conv_args, mode, srste_decay, kernel, observer):
        stride, padding, dilation, groups = conv_args
        w_eff = weight if mask is None else weight * mask
        out = F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, w_eff, mask, grad_mask)
        ctx.conv_args, ctx.mode, ctx.srste_decay, ctx.kernel, ctx.observer = (
            conv_args, mode, srste_decay, kernel, observer)
        ctx.has_bias = bias is not None
        if observer is not None:
            # Each output position of each output channel uses Cin/groups*kh*kw weights of its row.
            positions = out.shape[0] * out.shape[2] * out.shape[3]
            observer(PhaseCost(Phase.FORWARD, _count(mask, weight) * positions, weight.numel() * positions,
                               positions))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, w_eff, mask, grad_mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        mode, observer = ctx.mode, ctx.observer
        positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(x.shape, w_eff.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _count(mask, weight) * positions,
                                   weight.numel() * positions, positions))
        if ctx.needs_input_grad[1]:
            needed = _weight_grad_positions(mode, mask, grad_mask)
            if needed is not None and ctx.kernel is WeightGradKernel.GATHER and groups == 1:
                grad_w = _gather_conv_weight_grad(x, grad_out, needed, weight.shape, ctx.conv_args)
                executed = int(needed.count_nonzero()) * positions
            else:
                g_eff = conv2d_weight(x.to(grad_out.dtype), weight.shape, grad_out, stride, padding, dilation,
                                      groups).to(weight.dtype)
                grad_w = _finish_weight_grad(mode, g_eff, weight, mask, needed, ctx.srste_decay)
                executed = weight.numel() * positions
            if observer is not None:
                ideal = weight.numel() * positions if needed is None else int(needed.count_nonzero()) * positions
                observer(PhaseCost(Phase.WEIGHT_GRAD, ideal, executed, positions))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _gather_conv_weight_grad(x, grad_out, needed, weight_shape, conv_args) -> torch.Tensor:
    """Weight gradient of a (groups=1) conv at the ``needed`` positions only, via im2col columns.

    ``x`` is unfolded once to ``[B, K, L]`` (K = Cin*kh*kw, L = output positions); the needed
    entries of each output row then reduce over ``B*L`` as in the linear case.
    """
    stride, padding, dilation, _ = conv_args
    cout, cin, kh, kw = weight_shape
    cols = F.unfold(x.to(grad_out.dtype), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B,K,L]
    x2 = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, K]
    go2 = grad_out.reshape(grad_out.shape[0], cout, -1).transpose(1, 2).reshape(-1, cout)  # [B*L, Cout]
    g = _gather_linear_weight_grad(x2, go2, needed.reshape(cout, -1))
    return g.reshape(weight_shape).to(x.dtype if x.is_floating_point() else grad_out.dtype)


def nm_linear(x, weight, bias=None, mask=None, grad_mask=None, mode: Backward = Backward.SPARSE,
              srste_decay: float = 0.0, kernel: WeightGradKernel = WeightGradKernel.MASKED_DENSE,
              observer: Optional[Observer] = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` whose weight gradient follows ``mode``."""
    return _NMLinear.apply(x, weight, bias, mask, grad_mask, Backward.parse(mode), float(srste_decay),
                           WeightGradKernel(kernel), observer)


def nm_conv2d(x, weight, bias=None, mask=None, grad_mask=None, stride=1, padding=0, dilation=1, groups=1,
              mode: Backward = Backward.SPARSE, srste_decay: float = 0.0,
              kernel: WeightGradKernel = WeightGradKernel.MASKED_DENSE,
              observer: Optional[Observer] = None) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, ...)`` whose weight gradient follows ``mode``."""
    if isinstance(padding, str):
        raise ValueError(f"nm_conv2d needs numeric padding, got {padding!r}: pass the padding as integers")
    conv_args = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _NMConv2d.apply(x, weight, bias, mask, grad_mask, conv_args, Backward.parse(mode), float(srste_decay),
                           WeightGradKernel(kernel), observer)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)
