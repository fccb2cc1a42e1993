"""Which kernel computes the forward and the input gradient of an N:M layer, and running it.

``method.forward_kernel`` and ``method.input_grad_kernel`` (:class:`ForwardKernel`) each take:

- ``masked_dense`` (the default): the dense kernel on ``W*m`` (``F.conv2d`` / ``F.linear``, ``conv2d_input``);
- ``sparse``: the MKL CSR product of :mod:`bame.nm_kernels` (:data:`SPARSE_KERNEL`) on the compressed form of
  ``W*m``;
- ``auto``: per layer shape (weight, input, conv arguments, dtype, device, pattern) the fastest of masked
  dense, ``csr`` and ``bsr`` (with ``method.compile_kernels``: also ``compiled`` and, for stride-1 convs with
  output rows of 16 or more, ``direct``), timed once on the real tensors (one untimed and
  :data:`~bame.kernels.AUTO_TIMING_REPEATS` timed runs each, alternating, median), as the weight gradient's
  AUTO does. :func:`kernel_choices` lists the decisions.

The compressed form's index (:class:`~bame.nm_compressed.NMIndex`) is built from the mask once per mask
version (the mask cache of :mod:`bame.kernels`); its values are re-packed from the current weight at every
call (one ``index_select``), never in an optimizer hook. A layer the sparse kernels cannot run (groups != 1,
not on the CPU, half-precision weights, a mask that is not N:M) runs masked dense, and says why in its
record. ``auto`` keeps masked dense while the backward mode changes the mask every step (STE, SR-STE): a
rebuild per step costs more than the sparse product saves (docs/performance.md).

Under autocast the sparse kernels compute in float32 (MKL's CSR product has no half precision): their
output is float32, and their gradients equal the float32 masked-dense ones.

Shared columns: ``csr``/``bsr`` compute a conv's forward from the input's conv columns ``[K, B*L]``, the
layout of the weight gradient's SDDMM (:func:`~bame.kernels.gather_conv_weight_grad`). When that SDDMM may
run (backward mode ``sparse``, ``weight_grad_kernel`` ``gather`` or ``auto``), the forward keeps its columns
(:func:`conv_columns_kept`) and the weight gradient runs on them instead of an im2col of its own. They live
from the forward to the backward, ``kh*kw * Hout*Wout / (H*W)`` times the input's size: 9x for a 3x3 conv
with 'same' padding, 1x for a 1x1 conv (a copy), ``1 / stride^2`` of that for a strided one; in the
weight's dtype (float32 under autocast: twice the bytes of a bfloat16 input). Otherwise, and once ``auto``
chose masked dense for the weight gradient of that shape, none are kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from .kernels import AUTO_TIMING_REPEATS, WeightGradKernel, cached
from .nm import Layout, NMPattern, is_nm
from .nm_compressed import NMIndex
from .nm_kernels import (SparseKernel, conv_columns, pack, sparse_conv2d, sparse_conv2d_input_grad,
                         sparse_linear, sparse_linear_input_grad, unsupported)

__all__ = ["ForwardKernel", "SPARSE_KERNEL", "SparseKernels", "KernelChoice", "kernel_choices", "nm_index",
           "choose", "linear_forward", "linear_input_grad", "conv_forward", "conv_input_grad",
           "builds_shared_columns", "conv_columns_kept", "executed_macs"]

FORWARD, INPUT_GRAD = "forward", "input_grad"  # the phases these kernels compute (bame.contract's names)
WEIGHT_GRAD = "weight_grad"  # recorded here too: what ran the weight gradient (weight_grad_kernel)


class ForwardKernel(str, Enum):
    """How the forward (or the input gradient) of an N:M layer is computed (see the module docstring)."""

    MASKED_DENSE = "masked_dense"
    SPARSE = "sparse"
    AUTO = "auto"


SPARSE_KERNEL = SparseKernel.CSR  # what `sparse` runs: no compiler needed, never far from the best (phase 1)


class SparseKernels:
    """A layer's kernel settings for the forward, the input gradient and the weight gradient, and what ran.

    ``record`` maps a phase to the kernel that ran it last (``"csr"``, ``"masked_dense"``, ``"gather (shared
    columns)"``, with ``" (auto)"`` when timed, or a fallback reason); ``sparsify.csv`` reports it.
    """

    def __init__(self, forward: ForwardKernel | str, input_grad: ForwardKernel | str, pattern: NMPattern,
                 layout: Layout, compile_kernels: bool = False,
                 weight_grad: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE) -> None:
        self.forward, self.input_grad = ForwardKernel(forward), ForwardKernel(input_grad)
        self.weight_grad = WeightGradKernel(weight_grad)
        self.pattern, self.layout, self.compile_kernels = pattern, layout, bool(compile_kernels)
        self.record: dict[str, str] = {}

    def setting(self, phase: str) -> ForwardKernel | WeightGradKernel:
        return {FORWARD: self.forward, INPUT_GRAD: self.input_grad, WEIGHT_GRAD: self.weight_grad}[phase]

    def _not_masked_dense(self) -> list[str]:
        """The phases set to something other than ``masked_dense``."""
        return [p for p in (FORWARD, INPUT_GRAD, WEIGHT_GRAD) if self.setting(p).value != "masked_dense"]

    @property
    def in_use(self) -> bool:
        """Whether some phase is not set to ``masked_dense`` (else the layer takes the plain path)."""
        return bool(self._not_masked_dense())

    @property
    def pending(self) -> bool:
        """Whether a phase not set to ``masked_dense`` has not run yet (its kernel, or its fallback, is not known)."""
        return any(p not in self.record for p in self._not_masked_dense())

    def describe(self, phase: str) -> str:
        """What ran ``phase`` (the setting itself before the first call)."""
        return self.record.get(phase, self.setting(phase).value)


@dataclass(frozen=True)
class KernelChoice:
    """One ``auto`` decision: the kernel chosen (``None``: masked dense) and the timings (seconds) it was chosen by."""

    key: tuple
    kernel: Optional[SparseKernel]
    seconds: dict  # kernel name -> median seconds; a candidate that failed (a compiler missing): its reason

    @property
    def name(self) -> str:
        return "masked_dense" if self.kernel is None else self.kernel.value


_CHOICES: dict[tuple, KernelChoice] = {}


def kernel_choices() -> list[KernelChoice]:
    """The ``auto`` decisions this process made so far (one per phase and layer shape)."""
    return list(_CHOICES.values())


def nm_index(mask: torch.Tensor, kernels: SparseKernels) -> NMIndex:
    """The compressed form's index of ``mask``, built once per mask version."""
    kind = f"nm_index/{kernels.pattern}/{kernels.layout.value}"
    return cached(kind, (mask,), lambda m: NMIndex(m, kernels.pattern, kernels.layout))


def _refusal(kernels: SparseKernels, weight: torch.Tensor, mask: Optional[torch.Tensor], groups: int) -> Optional[str]:
    """Why no sparse kernel can run this layer call (``None`` when one can)."""
    if mask is None:
        return "no mask"
    reason = unsupported(SPARSE_KERNEL, weight.dtype, weight.device, groups)
    if reason is None and not cached("is_nm/" + str(kernels.pattern), (mask,),
                                     lambda m: is_nm(m, kernels.pattern.n, kernels.pattern.m, kernels.layout)):
        reason = f"mask is not {kernels.pattern}"
    return reason


def _candidates(kernels: SparseKernels, key_conv: Optional[tuple], out_row: int) -> list[Optional[SparseKernel]]:
    found: list[Optional[SparseKernel]] = [None, SparseKernel.CSR, SparseKernel.BSR]
    if kernels.compile_kernels:
        found.append(SparseKernel.COMPILED)
        # direct: measured 2-110x slower on strided convs and on output rows shorter than 16 (phase 1)
        if key_conv is not None and tuple(key_conv[0]) == (1, 1) and out_row >= 16:
            found.append(SparseKernel.DIRECT)
    return found


def choose(phase: str, kernels: Optional[SparseKernels], mask_moves: bool, shape_key: tuple,
           weight: torch.Tensor, mask: Optional[torch.Tensor], run: Callable[[Optional[SparseKernel]], object],
           conv_args: Optional[tuple] = None, out_row: int = 0) -> Optional[SparseKernel]:
    """The sparse kernel that computes ``phase`` of this call (``None``: masked dense), recorded in ``kernels``.

    ``run(kernel)`` computes the phase with ``kernel`` (``auto`` times it); ``mask_moves``: the backward mode
    changes the mask every step (``auto`` then keeps masked dense); ``out_row``: the output row length of a conv.
    """
    if kernels is None:
        return None
    setting = kernels.setting(phase)
    if setting is ForwardKernel.MASKED_DENSE:
        return None
    reason = _refusal(kernels, weight, mask, 1 if conv_args is None else conv_args[3])
    if reason is not None:
        kernels.record[phase] = f"masked_dense ({reason})"
        return None
    if setting is ForwardKernel.SPARSE:
        kernels.record[phase] = SPARSE_KERNEL.value
        return SPARSE_KERNEL
    if mask_moves:
        kernels.record[phase] = "masked_dense (auto: the mask changes every step)"
        return None
    key = (phase, str(kernels.pattern), kernels.layout.value, kernels.compile_kernels) + shape_key
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _time(key, _candidates(kernels, conv_args, out_row), run, weight.device)
    kernels.record[phase] = f"{hit.name} (auto)"
    return hit.kernel


def _time(key: tuple, candidates: list, run: Callable, device: torch.device) -> KernelChoice:
    def once(kernel) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run(kernel)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    failed: dict[str, str] = {}
    alive = []
    for kernel in candidates:  # one untimed run each (compiles the compiled kernels)
        try:
            once(kernel)
            alive.append(kernel)
        except RuntimeError as err:  # torch.compile without a working C++ compiler
            failed[kernel.value] = str(err).splitlines()[0]
    times: dict = {k: [] for k in alive}
    for _ in range(AUTO_TIMING_REPEATS):
        for kernel in alive:
            times[kernel].append(once(kernel))
    medians = {k: statistics.median(v) for k, v in times.items()}
    best = min(medians, key=lambda k: medians[k])
    seconds = {("masked_dense" if k is None else k.value): s for k, s in medians.items()}
    return KernelChoice(key, best, {**seconds, **failed})


def linear_forward(kernel: Optional[SparseKernel], x, weight, mask, bias, kernels: Optional[SparseKernels]):
    """``F.linear(x, W*m, bias)`` by ``kernel`` (``None``: masked dense)."""
    if kernel is None:
        return F.linear(x, weight if mask is None else weight * mask, bias)
    with torch.autocast(x.device.type, enabled=False):
        y = sparse_linear(x.to(weight.dtype), pack(nm_index(mask, kernels), weight, kernel), kernel)
        return y if bias is None else y + bias


def linear_input_grad(kernel: Optional[SparseKernel], grad_out, weight, mask, w_eff, kernels):
    """``grad_out @ (W*m)`` by ``kernel`` (``None``: masked dense with ``w_eff``)."""
    if kernel is None:
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        return (go2 @ w_eff.to(go2.dtype)).reshape(*grad_out.shape[:-1], -1)
    with torch.autocast(grad_out.device.type, enabled=False):
        operand_t = pack(nm_index(mask, kernels), weight, kernel, transpose=True)
        return sparse_linear_input_grad(grad_out.to(weight.dtype), operand_t, kernel)


def conv_forward(kernel: Optional[SparseKernel], x, weight, mask, bias, conv_args, kernels, columns=None):
    """``F.conv2d(x, W*m, bias, *conv_args)`` by ``kernel`` (``None``: masked dense); ``columns``: those of
    :func:`conv_columns_kept`, when the caller keeps them."""
    if kernel is None:
        return F.conv2d(x, weight if mask is None else weight * mask, bias, *conv_args)
    with torch.autocast(x.device.type, enabled=False):
        y = sparse_conv2d(x.to(weight.dtype), pack(nm_index(mask, kernels), weight, kernel), kernel,
                          weight.shape, conv_args, columns)
        return y if bias is None else y + bias.view(1, -1, 1, 1)


def builds_shared_columns(kernel: Optional[SparseKernel]) -> bool:
    """Whether ``kernel`` computes a conv's forward from ``[K, B*L]`` conv columns, the layout of the SDDMM
    weight gradient (``csr``, ``bsr``; the ELL kernels' columns are ``[B, K, L]``, ``direct`` builds none)."""
    return kernel is not None and not kernel.batch_major


def conv_columns_kept(x, weight, conv_args) -> torch.Tensor:
    """``x``'s conv columns ``[K, B*L]`` in the weight's dtype, as ``csr``/``bsr`` compute the forward from
    them, built by the caller to keep them for the weight gradient (pass them to :func:`conv_forward`)."""
    return conv_columns(x.to(weight.dtype), tuple(weight.shape[2:]), conv_args, batch_major=False)


def conv_input_grad(kernel: Optional[SparseKernel], grad_out, x_shape, weight, mask, w_eff, conv_args, kernels):
    """``conv2d_input(x_shape, W*m, grad_out, *conv_args)`` by ``kernel`` (``None``: masked dense with ``w_eff``)."""
    if kernel is None:
        return conv2d_input(x_shape, w_eff.to(grad_out.dtype), grad_out, *conv_args)
    with torch.autocast(grad_out.device.type, enabled=False):
        operand_t = pack(nm_index(mask, kernels), weight, kernel, transpose=True)
        return sparse_conv2d_input_grad(grad_out.to(weight.dtype), operand_t, kernel, x_shape,
                                        weight.shape, conv_args)


def executed_macs(kernel: SparseKernel, phase: str, index: NMIndex, positions: int, input_positions: int) -> int:
    """Multiply-adds ``kernel`` really runs for ``phase`` (the ELL kernels also multiply their padding zeros).

    ``positions``: output positions (batch x output pixels); ``input_positions``: batch x input pixels (the
    outputs of a direct input gradient, whose rows run over the flipped transposed conv).
    ``csr``/``bsr`` run the ideal work, which the caller reports (this is not called for them).
    """
    if kernel is SparseKernel.DIRECT and phase == INPUT_GRAD:
        return index.conv_t.cols.numel() * input_positions
    if phase == FORWARD:
        return index.ell.cols.numel() * positions
    return index.ell_t.cols.numel() * positions
