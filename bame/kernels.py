"""The kernels behind the sparse weight gradient, and the per-mask-version cache that keeps them from
reading the device every step.

- :class:`MaskCache`: values derived from mask tensors (non-zero counts, the needed positions
  ``mask | grad_mask``, GATHER's index plan), computed once per version of the masks they come from (keyed
  on the tensors' identity, ``_version`` and storage, so any in-place write, ``copy_`` or ``load_state_dict``
  invalidates them); a step whose masks did not change reads nothing back from the device. Writes through
  ``.data`` do not bump ``_version`` and are not supported (the FLOPs ledger makes the same assumption).
- :class:`Count` / :class:`LazyMacs`: a count still on the device, read when its reader chooses (the FLOPs
  ledger reads them all at the end of the step, one host sync).
- :class:`WeightGradKernel`: how ``SPARSE`` computes the weight gradient: a masked dense kernel, GATHER (an
  SDDMM over the needed positions only, ``torch.sparse.sampled_addmm``, after an im2col for k x k convs, or on
  the conv columns the forward's csr/bsr kernel built and kept), or AUTO (per layer shape and density, the
  faster of the two, timed once; :func:`use_gather`).

The autograd Functions that call these are ``bame.autograd``.
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

__all__ = ["WeightGradKernel", "MaskCache", "cached", "Count", "LazyMacs", "mask_count", "needed_positions", "needed_count",
           "AutoChoice", "AUTO_TIMING_REPEATS", "auto_kernel_choices", "auto_decision", "use_gather",
           "GatherPlan", "gather_plan", "sddmm", "gather_linear_weight_grad", "gather_conv_weight_grad"]


class WeightGradKernel(str, Enum):
    """How ``SPARSE`` mode computes the weight gradient."""

    MASKED_DENSE = "masked_dense"  # dense kernel, then multiply by (mask | grad_mask)
    GATHER = "gather"  # only the needed positions (executed work == ideal work)
    AUTO = "auto"  # per layer shape and density, the faster of the two, timed once (see use_gather)


class MaskCache:
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


_CACHE = MaskCache()  # the process's one cache


def cached(kind: str, tensors: tuple, compute: Callable[..., Any]) -> Any:
    """``compute(*tensors)``, computed once per version of ``tensors`` in the process's :class:`MaskCache`."""
    return _CACHE.get(kind, tensors, compute)


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


def mask_count(mask: Optional[torch.Tensor], like: torch.Tensor) -> int | Count:
    """Non-zeros of ``mask`` (``like.numel()`` without one), counted once per mask version."""
    if mask is None:
        return like.numel()
    return _CACHE.get("nnz", (mask,), lambda m: Count(m.count_nonzero()))


def needed_positions(mask: torch.Tensor, grad_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Where a ``SPARSE`` weight gradient is needed: ``mask | grad_mask``, cached per version of both (not
    recomputed every backward). Treat the result as read-only."""
    if grad_mask is None:
        return mask
    return _CACHE.get("needed", (mask, grad_mask), lambda m, g: m | g)


def needed_count(mask: torch.Tensor, grad_mask: Optional[torch.Tensor], needed: torch.Tensor) -> Count:
    """Non-zeros of ``needed = needed_positions(mask, grad_mask)``, once per mask version."""
    if grad_mask is None:
        return mask_count(mask, mask)
    return _CACHE.get("needed_nnz", (mask, grad_mask), lambda m, g: Count(needed.count_nonzero()))


@dataclass(frozen=True)
class AutoChoice:
    """One ``WeightGradKernel.AUTO`` decision: the kernel chosen and the timings it was chosen by.

    ``shared_columns``: GATHER was timed (and runs) on the conv columns the forward kept, not its own im2col.
    """

    key: tuple
    gather: bool
    gather_s: float
    masked_dense_s: float
    shared_columns: bool = False

    @property
    def name(self) -> str:
        """The kernel chosen: ``gather``, ``gather (shared columns)`` or ``masked_dense``."""
        if not self.gather:
            return WeightGradKernel.MASKED_DENSE.value
        return "gather (shared columns)" if self.shared_columns else WeightGradKernel.GATHER.value


_AUTO: dict[tuple, AutoChoice] = {}
AUTO_TIMING_REPEATS = 3  # timed runs of each kernel (after one untimed) per AUTO decision


def auto_kernel_choices() -> list[AutoChoice]:
    """The ``AUTO`` decisions this process made so far (one per layer shape, density and dtype)."""
    return list(_AUTO.values())


def _auto_key(shape_key: tuple, mask, grad_mask, needed: torch.Tensor, shared_columns: bool) -> tuple:
    density = int(needed_count(mask, grad_mask, needed)) / max(1, needed.numel())
    columns = "shared columns" if shared_columns else "own columns"
    return shape_key + (columns, str(needed.device), round(math.log2(density)) if density > 0 else -99)


def auto_decision(shape_key: tuple, mask, grad_mask, needed: torch.Tensor,
                  shared_columns: bool) -> Optional[bool]:
    """Whether ``AUTO`` already chose GATHER for this key (:func:`use_gather`); ``None``: not timed yet."""
    hit = _AUTO.get(_auto_key(shape_key, mask, grad_mask, needed, shared_columns))
    return None if hit is None else hit.gather


def use_gather(kernel: WeightGradKernel, shape_key: tuple, mask, grad_mask, needed: torch.Tensor,
               gather_fn: Callable[[], torch.Tensor], dense_fn: Callable[[], torch.Tensor],
               shared_columns: bool = False) -> bool:
    """Whether this SPARSE weight gradient runs GATHER.

    ``AUTO``: the first time a (layer shape, input shape, dtype, device, density class, columns) comes up,
    both kernels run on the real tensors (one untimed and ``AUTO_TIMING_REPEATS`` timed runs each,
    alternating, median) and the faster one is kept for every later call with that key. The density
    class is ``round(log2(needed fraction))``: a normal step at 1:16 (-4) and an adaptation step whose
    candidates fill the layer (0) are decided apart. ``shared_columns``: ``gather_fn`` runs on the conv
    columns the forward kept (no im2col of its own), a cheaper candidate decided apart. The two kernels
    agree to rounding, not bit for bit: a run in AUTO mode is reproducible only as far as the timings pick
    the same kernels.
    """
    if kernel is WeightGradKernel.GATHER:
        return True
    if kernel is not WeightGradKernel.AUTO:
        return False
    key = _auto_key(shape_key, mask, grad_mask, needed, shared_columns)
    hit = _AUTO.get(key)
    if hit is None:
        hit = _AUTO[key] = _time_kernels(key, gather_fn, dense_fn, needed.device, shared_columns)
    return hit.gather


def _time_kernels(key: tuple, gather_fn, dense_fn, device: torch.device, shared_columns: bool) -> AutoChoice:
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
    return AutoChoice(key, g < d, g, d, shared_columns)


@dataclass(frozen=True)
class GatherPlan:
    """The needed positions of a ``[Cout, K]`` weight gradient, as the sparsity pattern of an SDDMM."""

    shape: tuple[int, int]
    crow: torch.Tensor  # [Cout + 1] CSR row pointers (int32 unless the weight has 2^31 entries or more)
    col: torch.Tensor  # [nnz] CSR column indices (row-major order), as crow
    flat: torch.Tensor  # [nnz] int64, row * K + col: where each value goes in the dense gradient
    nnz: int
    _patterns: dict = field(default_factory=dict, compare=False, repr=False)  # dtype -> CSR pattern

    @classmethod
    def build(cls, needed: torch.Tensor) -> GatherPlan:
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


def gather_plan(mask: torch.Tensor, grad_mask: Optional[torch.Tensor], needed: torch.Tensor) -> GatherPlan:
    """The :class:`GatherPlan` of ``needed`` (``[Cout, K]``), built once per version of the masks."""
    return _CACHE.get("gather", (mask, grad_mask), lambda m, g: GatherPlan.build(needed))


_SDDMM_DTYPES = (torch.float32, torch.float64)


def sddmm(go_t: torch.Tensor, x_t: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
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


def gather_linear_weight_grad(x2: torch.Tensor, go2: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """``(go2^T @ x2)`` evaluated only at the plan's positions; ``x2`` is ``[P, K]``, ``go2`` ``[P, Cout]``."""
    return sddmm(go2.t(), x2.t(), plan)


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


def gather_conv_weight_grad(x, grad_out, plan: GatherPlan, weight_shape, conv_args,
                            columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight gradient of a (groups=1) conv at the plan's positions only.

    The input becomes conv columns ``[K, B*L]`` (K = Cin*kh*kw, L = output positions; for a 1x1 conv
    that is the input itself, subsampled by the stride), the output gradient ``[Cout, B*L]``; the needed
    entries of each output row then reduce over ``B*L`` as in the linear case. ``columns``: those conv
    columns of ``x``, already built (the forward's csr/bsr kernel kept them), used instead of building them.
    """
    stride, padding, dilation, _ = conv_args
    cout, cin, kh, kw = weight_shape
    if columns is not None:
        x_t = columns
    elif (kh, kw) == (1, 1) and padding == (0, 0):
        xs = x[:, :, ::stride[0], ::stride[1]] if stride != (1, 1) else x
        x_t = xs.transpose(0, 1).reshape(cin, -1)  # [Cin, B*Hout*Wout]
    else:
        x_t = _im2col_t(x, (kh, kw), stride, padding, dilation)
    go_t = grad_out.transpose(0, 1).reshape(cout, -1)  # [Cout, B*Hout*Wout]
    return sddmm(go_t, x_t, plan).reshape(weight_shape)
