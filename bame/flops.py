"""Exact training FLOPs: a per-step ledger (layer x phase x ideal/executed), its sum over ranks, and one
measured step of a whole model. It stands on the layers alone: the loop, ``bame flops`` and the benchmarks
stand on it.

Convention: every count is in multiply-accumulates (MACs); FLOPs = 2 x MACs (:data:`CONVENTION`, the
contract's). Conv and linear layers are counted, and self-attention's weightless matmuls QK^T and AV
(:mod:`bame.attention_flops`: dense, phases forward and input_grad, layer ``<attention>.matmul``); batch norm,
layer norm, activations, softmax, pooling and the optimizer are not. The closed forms of one call are
``bame.macs``.

The ledger is charged from the calls that really ran, never from a proportionality rule:

- N:M layers (:class:`bame.layers.NMLayer`) through their ``observer`` attribute: the autograd
  functions report one :class:`bame.autograd.PhaseCost` per phase that ran (forward, input
  gradient, weight gradient) with its ideal and executed MACs.
- plain ``nn.Conv2d`` / ``nn.Linear`` through a forward hook (forward MACs =
  ``weight.numel() * positions``, ``positions`` = batch x output pixels for a conv, rows for a linear;
  right for grouped convs too since the weight holds ``Cin/groups`` inputs per output) and a tensor
  hook on the output, which charges the input gradient (if the layer's input required grad: the
  first layer's input gradient is never computed, so never charged) and the weight gradient (if the
  weight requires grad) when the backward reaches the layer.

Two views: ``ideal`` (work on the weights actually used: ``nnz(W*m) x positions`` forward and input
gradient, ``|P| x positions`` weight gradient) and ``executed`` (what the kernels run here computed:
masked dense kernels execute dense work). Each (layer, phase) also records ``nm_on_reduction``:
whether the phase's sparse operand is N:M along that phase's own reduction axis, so that N:M hardware
could accelerate it (see :meth:`FlopsLedger._flag`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .attention_flops import AttentionHooks
from .autograd import PhaseCost
from .contract import ADAPTATION, ADAPTATION_LAYER, FLOPS_CONVENTION, FORWARD, INPUT_GRAD, LAYER_PHASES, WEIGHT_GRAD
from .contract import PHASES as CONTRACT_PHASES
from .distributed import all_sum_ints
from .kernels import LazyMacs
from .layers import NMLayer
from .macs import conv2d_macs, conv_output_hw, linear_macs
from .nm import group_counts

__all__ = ["CONVENTION", "PHASES", "ADAPTATION", "ADAPTATION_LAYER", "StepCost", "FlopsLedger", "RunFlops",
           "run_flops", "sum_rows_over_ranks", "conv_output_hw", "conv2d_macs", "linear_macs", "StepCosts",
           "model_step_costs"]

CONVENTION = FLOPS_CONVENTION
PHASES = LAYER_PHASES  # the phases of a conv/linear layer, in execution order (ALL_PHASES adds adaptation)
ALL_PHASES = CONTRACT_PHASES
_PHASE_ORDER = {p: i for i, p in enumerate(ALL_PHASES)}


# --------------------------------------------------------------------------------------------------
# The ledger


@dataclass(frozen=True)
class StepCost:
    """Work of one training step, in MACs (FLOPs = 2 x MACs), adaptation included."""

    ideal_macs: int
    executed_macs: int
    by_phase: dict[str, tuple[int, int]]  # phase -> (ideal, executed); every phase present
    by_layer: dict[tuple[str, str], tuple[int, int, bool]] = field(default_factory=dict)
    # (layer, phase) -> (ideal, executed, nm_on_reduction), only the pairs that were charged


@dataclass
class _Attached:
    module: nn.Module
    nm: bool
    handle: Any = None  # forward-hook handle (plain layers)
    observer: Any = None  # the closure set as ``module.observer`` (N:M layers)


class FlopsLedger:
    """Charges every conv/linear call of ``model`` per step, layer and phase (see the module docstring).

    ``enabled=False`` attaches nothing and counts nothing (every method still works and returns 0).
    Attach it after ``method.prepare(model)`` swapped in the N:M layers; ``begin_step`` re-scans the
    model, so a layer swapped in later is picked up at the next step.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.model = model
        self.enabled = bool(enabled)
        self._layers: dict[str, _Attached] = {}
        self._order: dict[str, int] = {}  # layer name -> position in model.named_modules()
        self._paused = 0
        self._live = self.enabled
        # (layer, phase) -> [ideal, executed, nm_on_reduction]: this step / since the last epoch_rows
        self._step: dict[tuple[str, str], list] = {}
        self._epoch: dict[tuple[str, str], list] = {}
        self.total_ideal_macs = 0
        self.total_executed_macs = 0
        self.total_by_phase: dict[str, list[int]] = {p: [0, 0] for p in ALL_PHASES}
        self.steps = 0
        # (layer, phase) -> (mask version key, flag); a flag is a 0-dim bool tensor until end_step reads it
        self._flag_cache: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}
        self._pending: list[tuple[tuple[str, str], torch.Tensor]] = []  # flags not read yet (no host sync)
        self._pending_macs: list[tuple[tuple[str, str], int, LazyMacs]] = []  # (key, 0 ideal | 1 executed, MACs)
        # attention matmuls: forward -> FORWARD, the gradients of both operands -> INPUT_GRAD
        self._attention = AttentionHooks(lambda layer, macs: self._charge_dense(layer, FORWARD, macs),
                                         lambda layer, macs: self._charge_dense(layer, INPUT_GRAD, macs))
        if self.enabled:
            self._attach()

    # -- attaching -------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Attach to every conv/linear of the model; re-attach where a layer was replaced."""
        seen = set()
        for i, (name, module) in enumerate(self.model.named_modules()):
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            seen.add(name)
            self._order[name] = i
            cur = self._layers.get(name)
            if cur is not None and cur.module is module:
                continue
            if cur is not None:
                self._detach_one(cur)
            self._layers[name] = self._attach_one(name, module)
        for name in [n for n in self._layers if n not in seen]:
            self._detach_one(self._layers.pop(name))
        self._order.update(self._attention.attach(self.model))

    def _attach_one(self, name: str, module: nn.Module) -> _Attached:
        if isinstance(module, NMLayer):
            def observer(cost: PhaseCost, _name=name, _layer=module) -> None:
                self._on_nm_cost(_name, _layer, cost)
            observer.lazy_counts = True  # new non-zero counts stay on the device until end_step
            if not self._paused:
                module.observer = observer
            return _Attached(module, True, observer=observer)

        def hook(mod, inputs, output, _name=name) -> None:
            self._on_plain_forward(_name, mod, inputs, output)
        return _Attached(module, False, handle=module.register_forward_hook(hook))

    @staticmethod
    def _detach_one(att: _Attached) -> None:
        if att.handle is not None:
            att.handle.remove()
        if att.nm and getattr(att.module, "observer", None) is att.observer:
            att.module.observer = None

    def detach(self) -> None:
        """Remove every hook and observer; the ledger then charges nothing more (totals stay)."""
        for att in self._layers.values():
            self._detach_one(att)
        self._layers.clear()
        self._attention.detach()
        self._live = False

    # -- charging --------------------------------------------------------------------------------
    def _charge(self, layer: str, phase: str, ideal: int, executed: int, flag) -> None:
        """Add work to this step; ``flag`` is a bool or a 0-dim bool tensor read at ``end_step``."""
        key = (layer, phase)
        acc = self._step.get(key)
        if acc is None:
            acc = self._step[key] = [0, 0, True]
        for i, macs in ((0, ideal), (1, executed)):
            if isinstance(macs, LazyMacs) and macs.count.value is None:
                self._pending_macs.append((key, i, macs))
            else:
                acc[i] += int(macs)
        if torch.is_tensor(flag):
            self._pending.append((key, flag))
        else:
            acc[2] = acc[2] and bool(flag)

    def _charge_dense(self, layer: str, phase: str, macs: int) -> bool:
        """Dense work of a weightless op (attention matmuls); False when nothing is charged now (paused)."""
        if not self._live or self._paused:
            return False
        self._charge(layer, phase, macs, macs, False)
        return True

    def _resolve_flags(self) -> None:
        """Read every pending flag and non-zero count with one host sync; cache flags as plain bools."""
        if not self._pending and not self._pending_macs:
            return
        counts = list({id(m.count): m.count for _, _, m in self._pending_macs if m.count.value is None}.values())
        tensors = [t for _, t in self._pending] + [c.tensor for c in counts]
        values = torch.stack([t.to(tensors[0].device, torch.int64) for t in tensors]).tolist() if tensors else []
        for c, v in zip(counts, values[len(self._pending):]):
            c.value = int(v)
        for key, i, macs in self._pending_macs:
            acc = self._step.get(key)
            if acc is None:
                acc = self._step[key] = [0, 0, True]
            acc[i] += int(macs)
        self._pending_macs = []
        values = values[:len(self._pending)]
        by_id = {id(t): bool(v) for t, v in zip(tensors, values)}
        for (key, _), v in zip(self._pending, values):
            if key in self._step:
                self._step[key][2] = self._step[key][2] and bool(v)
        for k, (version, flag) in list(self._flag_cache.items()):
            if torch.is_tensor(flag) and id(flag) in by_id:
                self._flag_cache[k] = (version, by_id[id(flag)])
        self._pending = []

    def _on_nm_cost(self, name: str, layer: NMLayer, cost: PhaseCost) -> None:
        if not self._live:
            return
        phase = cost.phase.value
        self._charge(name, phase, cost.ideal_macs, cost.executed_macs, self._flag(name, layer, phase))

    def _on_plain_forward(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._live or self._paused or not torch.is_tensor(output):
            return
        # conv output [B, Cout, H, W] (or unbatched [Cout, H, W]); linear output [..., Cout]
        cout = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        positions = output.numel() // cout
        macs = module.weight.numel() * positions
        self._charge(name, FORWARD, macs, macs, False)
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        need_input = bool(inputs) and torch.is_tensor(inputs[0]) and inputs[0].requires_grad
        need_weight = module.weight.requires_grad
        if not (need_input or need_weight):
            return

        def on_grad(_grad, _name=name) -> None:
            if not self._live:
                return
            if need_input:
                self._charge(_name, INPUT_GRAD, macs, macs, False)
            if need_weight:
                self._charge(_name, WEIGHT_GRAD, macs, macs, False)
        output.register_hook(on_grad)

    def _flag(self, name: str, layer: NMLayer, phase: str):
        """``nm_on_reduction`` of ``phase`` for an N:M layer.

        - forward reduces over K: is the mask N:M along K (in the layer's layout)?
        - input_grad computes ``dY @ (W*m)`` and reduces over Cout: is ``(W*m)^T``, viewed as
          ``[K, Cout]``, N:M along Cout (a transposable mask)? False when Cout/groups % M != 0. A layer
          with a backward mask of its own (Bi-Mask) is asked that of its backward mask, with the output
          channels taken in the layer's ``backward_order`` (N:M along the permuted Cout).
        - weight_grad reduces over batch x positions; neither operand is N:M along that axis (SPARSE
          mode only samples the output at ``P``, an SDDMM that N:M hardware does not accelerate), so
          always False, in every mode.

        Cached per mask version (``id`` and ``_version`` of the buffer: in-place writes bump it; a
        write through ``.data`` would not and is not supported). A new mask's flag is computed on the
        mask's device without a host sync and read, with every other, at ``end_step``.
        """
        pattern = layer.pattern
        if phase == WEIGHT_GRAD or pattern.is_dense:
            return False
        own = phase == INPUT_GRAD and layer.backward_mask is not None
        mask, order = (layer.backward_mask, layer.backward_order) if own else (layer.mask, None)
        key = (id(mask), mask._version) + ((id(order), order._version) if order is not None else ())
        hit = self._flag_cache.get((name, phase))
        if hit is not None and hit[0] == key:
            return hit[1]
        n, m = pattern.n, pattern.m
        with torch.no_grad():
            if phase == FORWARD:
                flag = (group_counts(mask, m, layer.layout) <= n).all()
            elif (mask.shape[0] // getattr(layer, "groups", 1)) % m == 0:
                rows = mask.reshape(mask.shape[0], -1)  # [Cout, K]
                rows = rows if order is None else rows[order]
                flag = (group_counts(rows.t(), m) <= n).all()
            else:
                flag = False
        self._flag_cache[(name, phase)] = (key, flag)
        return flag

    def charge_adaptation(self, ops: int) -> None:
        """Book the element-wise work of scoring and selection (its own line, phase ``adaptation``)."""
        if self.enabled and ops:
            self._charge(ADAPTATION_LAYER, ADAPTATION, int(ops), int(ops), False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing run inside is charged (evaluation); a forward run inside is not charged on backward."""
        self._paused += 1
        if self._paused == 1:
            for att in self._layers.values():
                if att.nm and getattr(att.module, "observer", None) is att.observer:
                    att.module.observer = None
        try:
            yield
        finally:
            self._paused -= 1
            if self._paused == 0 and self._live:
                for att in self._layers.values():
                    if att.nm:
                        att.module.observer = att.observer

    # -- steps and totals ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a step: picks up layers swapped in since the last step. Work charged since the last
        ``end_step`` (outside ``paused``) is kept and counted in this step."""
        if self._live:
            self._attach()

    def end_step(self) -> StepCost:
        """Close the step: fold its work into the epoch rows and the cumulative totals; return it."""
        self._resolve_flags()
        by_phase = {p: [0, 0] for p in ALL_PHASES}
        for (layer, phase), (ideal, executed, flag) in self._step.items():
            by_phase[phase][0] += ideal
            by_phase[phase][1] += executed
            acc = self._epoch.get((layer, phase))
            if acc is None:
                self._epoch[(layer, phase)] = [ideal, executed, flag]
            else:
                acc[0] += ideal
                acc[1] += executed
                acc[2] = acc[2] and flag
        ideal = sum(v[0] for v in by_phase.values())
        executed = sum(v[1] for v in by_phase.values())
        for p, (i, e) in by_phase.items():
            self.total_by_phase[p][0] += i
            self.total_by_phase[p][1] += e
        self.total_ideal_macs += ideal
        self.total_executed_macs += executed
        cost = StepCost(ideal, executed, {p: (v[0], v[1]) for p, v in by_phase.items()},
                        {k: (v[0], v[1], v[2]) for k, v in self._step.items()})
        self._step = {}
        if self.enabled:
            self.steps += 1
        return cost

    def _sort_key(self, key: tuple[str, str]) -> tuple[int, int]:
        layer, phase = key
        return (self._order.get(layer, sys.maxsize), _PHASE_ORDER.get(phase, len(_PHASE_ORDER)))

    def epoch_rows(self, epoch: int, step: int) -> list[dict]:
        """Rows ``epoch, step, layer, phase, ideal_macs, executed_macs, nm_on_reduction`` for the work of
        the steps closed since the last call (layers in model order, phases in execution order); a
        (layer, phase) that did no work has no row. ``nm_on_reduction`` holds for every call counted."""
        rows = [dict(epoch=epoch, step=step, layer=layer, phase=phase, ideal_macs=v[0], executed_macs=v[1],
                     nm_on_reduction=v[2])
                for (layer, phase), v in sorted(self._epoch.items(), key=lambda kv: self._sort_key(kv[0]))]
        self._epoch = {}
        return rows

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cumulative totals and the not yet reported epoch rows (for a mid-epoch resume)."""
        return {
            "convention": CONVENTION,
            "steps": self.steps,
            "total_ideal_macs": self.total_ideal_macs,
            "total_executed_macs": self.total_executed_macs,
            "total_by_phase": {p: list(v) for p, v in self.total_by_phase.items()},
            "pending_rows": [[layer, phase, v[0], v[1], v[2]] for (layer, phase), v in self._epoch.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.total_ideal_macs = int(state["total_ideal_macs"])
        self.total_executed_macs = int(state["total_executed_macs"])
        self.total_by_phase = {p: [0, 0] for p in ALL_PHASES}
        for p, v in state.get("total_by_phase", {}).items():
            self.total_by_phase[p] = [int(v[0]), int(v[1])]
        self._epoch = {(layer, phase): [int(i), int(e), bool(f)]
                       for layer, phase, i, e, f in state.get("pending_rows", [])}


# --------------------------------------------------------------------------------------------------
# The run's counts over ranks (torchrun)


@dataclass(frozen=True)
class RunFlops:
    """The ledger's counts for the whole run so far, summed over ranks, in MACs."""

    step_ideal: int  # the last step's ideal work
    ideal: int
    executed: int
    by_phase: dict[str, tuple[int, int]]  # phase -> (ideal, executed)


def run_flops(ledger: FlopsLedger, last_step: StepCost, world_size: int = 1) -> RunFlops:
    """The run's counts: each rank's ledger counts the conv/linear work of its own shard of every global
    batch, so their sum is the run's work (a collective under torchrun). The mask-adaptation line is
    different: every rank scores and selects the same blocks (replicated, so that no mask needs to be
    sent); the run *needed* it once (ideal: once) and *ran* it on every rank (executed: the sum)."""
    by_phase = {k: list(v[:2]) for k, v in ledger.total_by_phase.items()}
    adapt_step = last_step.by_phase.get(ADAPTATION, (0, 0))[0]
    adapt_all = by_phase.get(ADAPTATION, [0, 0])[0]
    sums = all_sum_ints([last_step.ideal_macs, adapt_step, ledger.total_ideal_macs, ledger.total_executed_macs,
                         adapt_all] + [v for k in by_phase for v in by_phase[k]])
    w = world_size
    step_ideal, step_adapt, ideal, executed, adapt_all = sums[:5]
    once = adapt_all - adapt_all // w  # the replicated copies of the adaptation line's ideal count
    phases = {k: [sums[5 + 2 * i], sums[6 + 2 * i]] for i, k in enumerate(by_phase)}
    if ADAPTATION in phases:
        phases[ADAPTATION][0] //= w
    return RunFlops(step_ideal - (step_adapt - step_adapt // w), ideal - once, executed,
                    {k: tuple(v) for k, v in phases.items()})


def sum_rows_over_ranks(rows: list[dict], world_size: int) -> list[dict]:
    """``epoch_rows`` of every rank summed (the ranks have the same rows: same layers, phases, batch size);
    the adaptation line counts once in ideal (see :func:`run_flops`). The rows themselves for one process."""
    if world_size <= 1:
        return rows
    sums = all_sum_ints([v for r in rows for v in (r["ideal_macs"], r["executed_macs"])])
    for i, r in enumerate(rows):
        once = r["phase"] == ADAPTATION  # replicated on every rank: ideal once
        r["ideal_macs"] = sums[2 * i] // world_size if once else sums[2 * i]
        r["executed_macs"] = sums[2 * i + 1]
    return rows


# --------------------------------------------------------------------------------------------------
# One measured step of a whole model (used by ``bame flops`` and the tests)


@dataclass(frozen=True)
class StepCosts:
    """One normal step and one adaptation step of the same model, measured at ``batch``."""

    batch: int
    step: StepCost
    adapt: StepCost


def _measure(model: nn.Module, x: torch.Tensor) -> StepCost:
    ledger = FlopsLedger(model)
    try:
        ledger.begin_step()
        out = model(x)
        out = out if torch.is_tensor(out) else out[0]
        out.float().sum().backward()
        return ledger.end_step()
    finally:
        ledger.detach()


def model_step_costs(model: nn.Module, input_shape: Sequence[int], method=None, *,
                     device: str | torch.device = "cpu") -> StepCosts:
    """Measure one training step of ``model`` on a random batch of ``input_shape`` (``[B, C, H, W]``).

    With ``method``, ``method.prepare(model)`` makes the model sparse first (in place). The step is a
    real forward + backward (loss: the sum of the outputs) with a :class:`FlopsLedger` attached, images
    not requiring grad. ``step``: every N:M layer's ``grad_mask`` cleared (``P = m``); ``adapt``: every
    ``grad_mask`` set to ``~mask`` (BAME's first adaptation step with every block a candidate and none
    frozen). Grad masks, gradients and the train/eval mode are restored afterwards; the model runs in
    eval mode so batch-norm statistics do not move.
    """
    if method is not None:
        model = method.prepare(model)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(input_shape), generator=gen).to(device)
    nm = [m for m in model.modules() if isinstance(m, NMLayer)]
    saved_grad_masks = [m.grad_mask.clone() for m in nm]
    saved_grads = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        costs = []
        for adapt in (False, True):
            with torch.no_grad():
                for m in nm:
                    m.grad_mask.copy_(~m.mask if adapt else torch.zeros_like(m.mask))
            for p in model.parameters():
                p.grad = None
            costs.append(_measure(model, x))
    finally:
        with torch.no_grad():
            for m, g in zip(nm, saved_grad_masks):
                m.grad_mask.copy_(g)
        for p, g in saved_grads:
            p.grad = g
        model.train(was_training)
    return StepCosts(int(input_shape[0]), costs[0], costs[1])
