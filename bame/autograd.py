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

Host syncs: the non-zero counts the observer needs, the needed-position union ``mask | grad_mask`` and
GATHER's index plan are cached per mask version (:class:`_MaskCache`: keyed on the tensors' identity,
``_version`` and storage, so any in-place write, ``copy_`` or ``load_state_dict`` invalidates them), so
a step whose masks did not change reads nothing back from the device. A new count stays on the device
for an observer that takes :class:`LazyMacs` (the FLOPs ledger reads them all at the end of the step). Writes through ``.data`` do not
bump ``_version`` and are not supported (the FLOPs ledger makes the same assumption).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import contract

__all__ = ["Backward", "Phase", "PhaseCost", "WeightGradKernel", "Count", "LazyMacs", "AutoChoice",
           "auto_kernel_choices", "nm_conv2d", "nm_linear"]


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


class WeightGradKernel(str, Enum):
    """How ``SPARSE`` mode computes the weight gradient."""

    MASKED_DENSE = "masked_dense"  # dense kernel, then multiply by (mask | grad_mask)
    GATHER = "gather"  # only the needed positions (executed work == ideal work)
    AUTO = "auto"  # per layer shape and density, the faster of the two, timed once (see _use_gather)


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


class _MaskCache:
    """Values derived from mask tensors, computed once per version of the masks they come from.

    ``get(kind, tensors, compute)`` returns ``compute(*tensors)`` from the last call with the same
    ``kind`` and the same tensor objects, unless one of them was written since (``_version``), moved
    to other storage (``data_ptr``) or died (weak references; an entry goes when a tensor dies).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple, tuple, Any]] = {}

    @staticmethod
    def _state(tensors: tuple) -> tuple:
        return tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)

    def get(self, kind: str, tensors: tuple, compute: Callable[..., Any]) -> Any:
        key = (kind,) + tuple(id(t) for t in tensors)
        state = self._state(tensors)
        hit = self._entries.get(key)
        if hit is not None:
            refs, old_state, value = hit
            if old_state == state and all((r is None and t is None) or (r is not None and r() is t)
                                          for r, t in zip(refs, tensors)):
                return value
        value = compute(*tensors)
        drop = self._dropper(key)
        refs = tuple(None if t is None else weakref.ref(t, drop) for t in tensors)
        self._entries[key] = (refs, state, value)
        return value

    def _dropper(self, key: tuple) -> Callable[[Any], None]:
        entries = self._entries

        def drop(_ref) -> None:
            hit = entries.get(key)
            if hit is not None and any(r is not None and r() is None for r in hit[0]):
                del entries[key]
        return drop

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _MaskCache()


class Count:
    """A count computed on the device; ``int()`` reads it (one host sync) the first time and keeps it."""

    __slots__ = ("tensor", "value")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # 0-dim int64
        self.value: Optional[int] = None

    def __int__(self) -> int:
        if self.value is None:
            self.value = int(self.tensor)
        return self.value


class LazyMacs:
    """``count x positions`` MACs whose count was not read from the device yet (``int()`` reads it).

    An observer with the attribute ``lazy_counts = True`` may receive these in a :class:`PhaseCost`
    instead of ints and read them when it chooses (the FLOPs ledger: all at once at the end of the
    step, one host sync); every other observer receives ints.
    """

    __slots__ = ("count", "positions")

    def __init__(self, count: Count, positions: int) -> None:
        self.count, self.positions = count, positions

    def __int__(self) -> int:
        return int(self.count) * self.positions


def _macs(count: int | Count, positions: int, observer) -> int | LazyMacs:
    """``count * positions`` as an int, or lazily for an observer that takes lazy counts."""
    if isinstance(count, int):
        return count * positions
    if count.value is None and getattr(observer, "lazy_counts", False):
        return LazyMacs(count, positions)
    return int(count) * positions


def _count(mask: Optional[torch.Tensor], like: torch.Tensor) -> int | Count:
    """Non-zeros of ``mask`` (``like.numel()`` without one), counted once per mask version."""
    if mask is None:
        return like.numel()
    return _CACHE.get("nnz", (mask,), lambda m: Count(m.count_nonzero()))


def _weight_grad_positions(mode: Backward, mask, grad_mask) -> Optional[torch.Tensor]:
    """Positions where the weight gradient is needed; ``None`` means every position.

    The union ``mask | grad_mask`` is cached per version of both (not recomputed every backward).
    Treat the result as read-only.
    """
    if mode is not Backward.SPARSE or mask is None:
        return None
    if grad_mask is None:
        return mask
    return _CACHE.get("needed", (mask, grad_mask), lambda m, g: m | g)


def _needed_count(mask, grad_mask, needed: torch.Tensor) -> Count:
    """Non-zeros of ``needed = _weight_grad_positions(SPARSE, mask, grad_mask)``, once per mask version."""
    if grad_mask is None:
        return _count(mask, mask)
    return _CACHE.get("needed_nnz", (mask, grad_mask), lambda m, g: Count(needed.count_nonzero()))


@dataclass(frozen=True)
class AutoChoice:
    """One ``WeightGradKernel.AUTO`` decision: the kernel chosen and the timings it was chosen by."""

    key: tuple
    gather: bool
    gather_s: float
    masked_dense_s: float


_AUTO: dict[tuple, AutoChoice] = {}
AUTO_TIMING_REPEATS = 3  # timed runs of each kernel (after one untimed) per AUTO decision


def auto_kernel_choices() -> list[AutoChoice]:
    """The ``AUTO`` decisions this process made so far (one per layer shape, density and dtype)."""
    return list(_AUTO.values())


def _use_gather(kernel: WeightGradKernel, shape_key: tuple, mask, grad_mask, needed: torch.Tensor,
                gather_fn: Callable[[], torch.Tensor], dense_fn: Callable[[], torch.Tensor]) -> bool:
    """Whether this SPARSE weight gradient runs GATHER.

    ``AUTO``: the first time a (layer shape, input shape, dtype, device, density class) comes up, both
    kernels run on the real tensors (one untimed and ``AUTO_TIMING_REPEATS`` timed runs each,
    alternating, median) and the faster one is kept for every later call with that key. The density
    class is ``round(log2(needed fraction))``: a normal step at 1:16 (-4) and an adaptation step whose
    candidates fill the layer (0) are decided apart. The two kernels agree to rounding, not bit for bit:
    a run in AUTO mode is reproducible only as far as the timings pick the same kernels.
    """
    if kernel is WeightGradKernel.GATHER:
        return True
    if kernel is not WeightGradKernel.AUTO:
        return False
    density = int(_needed_count(mask, grad_mask, needed)) / max(1, needed.numel())
    key = shape_key + (str(needed.device), round(math.log2(density)) if density > 0 else -99)
    hit = _AUTO.get(key)
    if hit is None:
        hit = _AUTO[key] = _time_kernels(key, gather_fn, dense_fn, needed.device)
    return hit.gather


def _time_kernels(key: tuple, gather_fn, dense_fn, device: torch.device) -> AutoChoice:
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    run(gather_fn), run(dense_fn)
    tg, td = [], []
    for _ in range(AUTO_TIMING_REPEATS):
        tg.append(run(gather_fn))
        td.append(run(dense_fn))
    g, d = statistics.median(tg), statistics.median(td)
    return AutoChoice(key, g < d, g, d)


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
                 dense_g_eff: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The weight gradient of ``ctx.mode``, by the kernel ``ctx.kernel`` picks, and its cost report.

    ``gather(needed)`` computes it only at the needed positions (None where that kernel cannot run);
    ``dense_g_eff()`` computes ``dL/dW_eff`` at every position.
    """
    mode, observer = ctx.mode, ctx.observer
    needed = _weight_grad_positions(mode, mask, grad_mask)

    def gather_fn() -> torch.Tensor:
        return gather(needed).to(weight.dtype)

    def dense_fn() -> torch.Tensor:
        return _finish_weight_grad(mode, dense_g_eff().to(weight.dtype), weight, mask, needed, ctx.srste_decay)

    use_gather = needed is not None and gather is not None and _use_gather(
        ctx.kernel, shape_key, mask, grad_mask, needed, gather_fn, dense_fn)
    grad_w = gather_fn() if use_gather else dense_fn()
    if observer is not None:
        ideal = weight.numel() * positions if needed is None else \
            _macs(_needed_count(mask, grad_mask, needed), positions, observer)
        observer(PhaseCost(Phase.WEIGHT_GRAD, ideal, ideal if use_gather else weight.numel() * positions,
                           positions))
    return grad_w


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
            observer(PhaseCost(Phase.FORWARD, _macs(_count(mask, weight), positions, observer),
                               weight.numel() * positions, positions))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, w_eff, mask, grad_mask = ctx.saved_tensors
        observer = ctx.observer
        go2 = grad_out.reshape(-1, grad_out.shape[-1])  # [positions, Cout]
        x2 = x.reshape(-1, x.shape[-1])  # [positions, K]
        positions = go2.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (go2 @ w_eff.to(go2.dtype)).reshape(x.shape)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _macs(_count(mask, weight), positions, observer),
                                   weight.numel() * positions, positions))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(
                ctx, weight, mask, grad_mask, positions,
                ("linear", tuple(weight.shape), tuple(x2.shape), str(go2.dtype)),
                lambda needed: _gather_linear_weight_grad(x2, go2, _gather_plan(mask, grad_mask, needed)),
                lambda: go2.t() @ x2.to(go2.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = go2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


@dataclass(frozen=True)
class _GatherPlan:
    """The needed positions of a ``[Cout, K]`` weight gradient, as the sparsity pattern of an SDDMM."""

    shape: tuple[int, int]
    crow: torch.Tensor  # [Cout + 1] CSR row pointers (int32 unless the weight has 2^31 entries or more)
    col: torch.Tensor  # [nnz] CSR column indices (row-major order), as crow
    flat: torch.Tensor  # [nnz] int64, row * K + col: where each value goes in the dense gradient
    nnz: int
    _patterns: dict = field(default_factory=dict, compare=False, repr=False)  # dtype -> CSR pattern

    @classmethod
    def build(cls, needed: torch.Tensor) -> _GatherPlan:
        cout, k = needed.shape
        flat = needed.reshape(-1).nonzero().squeeze(1)  # row-major = CSR order (one host read)
        rows = torch.div(flat, k, rounding_mode="floor")
        crow = torch.zeros(cout + 1, dtype=torch.int64, device=needed.device)
        crow[1:] = torch.bincount(rows, minlength=cout).cumsum(0)
        col = flat - rows * k
        if needed.numel() < 2 ** 31:  # 32-bit CSR indices: what every sparse backend (cuSPARSE too) takes
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        return cls((cout, k), crow, col, flat, int(flat.numel()))

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """The CSR tensor (zero values) whose sparsity pattern ``sampled_addmm`` samples at."""
        csr = self._patterns.get(dtype)
        if csr is None:
            values = torch.zeros(self.nnz, dtype=dtype, device=self.flat.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                csr = self._patterns[dtype] = torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                                                      check_invariants=False)
        return csr


def _gather_plan(mask: torch.Tensor, grad_mask: Optional[torch.Tensor], needed: torch.Tensor) -> _GatherPlan:
    """The :class:`_GatherPlan` of ``needed`` (``[Cout, K]``), built once per version of the masks."""
    return _CACHE.get("gather", (mask, grad_mask), lambda m, g: _GatherPlan.build(needed))


_SDDMM_DTYPES = (torch.float32, torch.float64)


def _sddmm(go_t: torch.Tensor, x_t: torch.Tensor, plan: _GatherPlan) -> torch.Tensor:
    """``go_t @ x_t^T`` evaluated only at the plan's positions (an SDDMM); zero elsewhere, ``[Cout, K]``.

    ``go_t`` is ``[Cout, P]``, ``x_t`` is ``[K, P]`` (``P`` = batch x output positions), both best
    contiguous: the CPU kernel takes one dot product of two contiguous rows of length ``P`` per needed
    position, cuSPARSE the same layout. Nothing of size ``[Cout, K]``-dense is computed, so the executed
    MACs equal the ideal ones. Computed in float32 (float64 stays float64).
    """
    dtype = go_t.dtype if go_t.dtype in _SDDMM_DTYPES else torch.float32
    cout, k = plan.shape
    out = torch.zeros(cout * k, dtype=dtype, device=go_t.device)
    if plan.nnz:
        vals = torch.sparse.sampled_addmm(plan.pattern(dtype), go_t.to(dtype).contiguous(),
                                          x_t.to(dtype).contiguous().t(), beta=0.0)
        out[plan.flat] = vals.values()
    return out.view(cout, k)


def _gather_linear_weight_grad(x2: torch.Tensor, go2: torch.Tensor, plan: _GatherPlan) -> torch.Tensor:
    """``(go2^T @ x2)`` evaluated only at the plan's positions; ``x2`` is ``[P, K]``, ``go2`` ``[P, Cout]``."""
    return _sddmm(go2.t(), x2.t(), plan)


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
            observer(PhaseCost(Phase.FORWARD, _macs(_count(mask, weight), positions, observer),
                               weight.numel() * positions, positions))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, w_eff, mask, grad_mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        observer = ctx.observer
        positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(x.shape, w_eff.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
            if observer is not None:
                observer(PhaseCost(Phase.INPUT_GRAD, _macs(_count(mask, weight), positions, observer),
                                   weight.numel() * positions, positions))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(
                ctx, weight, mask, grad_mask, positions,
                ("conv", tuple(weight.shape), tuple(x.shape), ctx.conv_args, str(grad_out.dtype)),
                None if groups != 1 else lambda needed: _gather_conv_weight_grad(
                    x, grad_out, _gather_plan(mask, grad_mask, needed.reshape(needed.shape[0], -1)), weight.shape,
                    ctx.conv_args),
                lambda: conv2d_weight(x.to(grad_out.dtype), weight.shape, grad_out, stride, padding, dilation, groups))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _im2col_t(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """``x`` ``[B, Cin, H, W]`` as conv columns ``[Cin*kh*kw, B*Hout*Wout]`` (the weight's K order), written
    in one pass, one strided copy per kernel offset (``F.unfold`` then a transpose would copy twice)."""
    b, cin, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    cols = x.new_empty(cin, kh, kw, b, hout, wout)
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i * dh:i * dh + sh * (hout - 1) + 1:sh, j * dw:j * dw + sw * (wout - 1) + 1:sw]
            cols[:, i, j].copy_(win.transpose(0, 1))  # [Cin, B, Hout, Wout]
    return cols.view(cin * kh * kw, b * hout * wout)


def _gather_conv_weight_grad(x, grad_out, plan: _GatherPlan, weight_shape, conv_args) -> torch.Tensor:
    """Weight gradient of a (groups=1) conv at the plan's positions only.

    The input becomes conv columns ``[K, B*L]`` (K = Cin*kh*kw, L = output positions; for a 1x1 conv
    that is the input itself, subsampled by the stride), the output gradient ``[Cout, B*L]``; the needed
    entries of each output row then reduce over ``B*L`` as in the linear case.
    """
    stride, padding, dilation, _ = conv_args
    cout, cin, kh, kw = weight_shape
    if (kh, kw) == (1, 1) and padding == (0, 0):
        xs = x[:, :, ::stride[0], ::stride[1]] if stride != (1, 1) else x
        x_t = xs.transpose(0, 1).reshape(cin, -1)  # [Cin, B*Hout*Wout]
    else:
        x_t = _im2col_t(x, (kh, kw), stride, padding, dilation)
    go_t = grad_out.transpose(0, 1).reshape(cout, -1)  # [Cout, B*Hout*Wout]
    return _sddmm(go_t, x_t, plan).reshape(weight_shape)


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
