"""``lbc``: learnable N:M combinations (LBC, Zhang et al., NeurIPS 2022).

Each group of M weights of an N:M layer has a learnable score for each of its ``C = C(M, N)`` candidate
masks and an alive flag for each; the mask is the union of the alive combinations (:mod:`bame.lbc_core`):
dense at the start, exactly N:M once one combination is left per group. One step ``t``:

- ``before_step``: the schedule asks for ``s = 1 + ceil((C - 1)(1 - (t/T - t_i)/(t_f - t_i))^3)``
  combinations per group (``C`` up to ``t_i``, 1 from ``t_f``; fractions of the ``T`` schedule steps); where a
  group has more alive, the lowest scores are cut and the mask follows. Once every group has one left the
  scores are frozen (no gradient, so the optimizer leaves them alone) and the mask stays as it is.
- forward and input gradient through ``W * m``; weight gradient ``m * dL/d(W * m)`` (the ``SPARSE``
  backward with the mask: their autograd through ``mask * W``), all three at the current mask's density.
- ``after_backward``: each alive score's gradient, straight through the binarised mask, ``sum over the
  positions j of the combination of G_j W_j`` with ``G = dL/d(W * m)`` (needed only where ``m = 1``, where
  the weight's gradient is ``G``); the optimizer updates the scores with the weights (its ``method``
  group: same learning rate, momentum and weight decay, as their ResNet code).

Scores and alive flags are the method's (state dict), outside the model, so DDP sees only the weights; the
score gradients come from the all-reduced weight gradients, so every rank makes the same cuts. The scores
add ``C/M`` floats per weight (3x with SGD's gradient and momentum): 1.5 at 2:4, 1 at 1:16, 3.5 at 2:8, 8.75
at 4:8; patterns with more than ``method.lbc.max_combinations`` combinations are refused.
docs/method.md lists where this departs from their code.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch
from torch import nn

from ..autograd import Backward
from ..lbc_core import (MAX_COMBINATIONS, check_combinations, combination_table, cut_combinations, initial_scores,
                        layer_mask, lbc_elementwise_ops, score_grad, surviving_combinations)
from ..layers import NMLayer
from ..schema import Section, at_least
from .base import GradientSegment, Method, extend_plan, register

__all__ = ["Lbc", "LbcConfig"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class LbcConfig(Section):
    """``lbc``: the schedule of the cuts and the memory limit."""

    t_i_fraction: float = 0.0  # cuts start after this fraction of the training steps ...
    t_f_fraction: float = 0.5  # ... and leave one combination per group from this one (their README: 0, 60 of 120)
    exponent: float = 3.0  # of the schedule (their ResNet code; their DeiT code uses 4)
    max_combinations: int = MAX_COMBINATIONS  # refuse patterns with more C(M, N) scores per group than this

    def problems(self, method: Any) -> list[tuple[str, str]]:
        out = []
        if not 0.0 <= self.t_i_fraction < self.t_f_fraction <= 1.0:
            out.append(("t_i_fraction", f"needs 0 <= t_i_fraction < t_f_fraction <= 1 (fractions of training), got "
                        f"{self.t_i_fraction} and {self.t_f_fraction}"))
        if self.exponent <= 0:
            out.append(("exponent", f"must be > 0, got {self.exponent}"))
        out += at_least(self, ("max_combinations",), 1)
        if not out and not method.pattern.is_dense:
            try:
                check_combinations(method.pattern.n, method.pattern.m, self.max_combinations)
            except ValueError as err:
                out.append(("max_combinations", str(err)))
        return out


@dataclass
class _LayerState:
    """One layer's combinations: scores and alive flags ``[G, C]``, the table ``[C, M]``."""

    scores: nn.Parameter
    alive: torch.Tensor
    table: torch.Tensor
    num_alive: int  # alive.sum(), and the mask's non-zeros, kept so a step without cuts reads nothing back
    nnz: int


@register("lbc", config=LbcConfig)
class Lbc(Method):
    """LBC: the union of the alive combinations of each group, cut on the cubic schedule, scores learned by STE."""

    backward_mode = Backward.SPARSE
    flops_note = ("the masks between the first cut and t_f are counted at the most positions s alive combinations "
                  "can cover, min(M, sN) per group: exact for N = 1, an upper bound otherwise")

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.lcfg = cfg.lbc
        self.state: dict[str, _LayerState] = {}
        self.settled = False  # every group of every layer has one combination left: scores frozen
        self._ops = 0

    # -- set-up --------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        for name, layer in self.layers():
            n, m = layer.pattern.n, layer.pattern.m
            try:
                check_combinations(n, m, self.lcfg.max_combinations)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            device = layer.weight.device
            groups = layer.weight.numel() // m
            scores = nn.Parameter(initial_scores(groups, n, m, layer.weight.dtype, device))
            alive = torch.ones(scores.shape, dtype=torch.bool, device=device)
            self.state[name] = _LayerState(scores, alive, combination_table(n, m, device), 0, 0)
            self._set_mask(layer, self.state[name])  # dense: every combination alive
        return model

    def own_parameters(self) -> list[nn.Parameter]:
        return [st.scores for st in self.state.values()]

    def _set_mask(self, layer: NMLayer, st: _LayerState) -> None:
        layer.mask.copy_(layer_mask(st.alive, st.table, layer.weight.shape, layer.layout))
        st.num_alive, st.nnz = int(st.alive.sum()), int(layer.mask.sum())

    # -- the schedule --------------------------------------------------------------------------
    def survivors(self, step: int, total: int) -> int:
        """Combinations per group the schedule asks for at ``step`` (of ``total``)."""
        c = self.lcfg
        return surviving_combinations(step / self.ctx.total_steps, total, c.t_i_fraction, c.t_f_fraction, c.exponent)

    def cuts(self, total: int) -> list[tuple[int, int]]:
        """``(step, survivors)`` at every step where the schedule asks ``total`` combinations for fewer than at
        the step before (the schedule never rises: one binary search per count)."""
        out: list[tuple[int, int]] = []
        for k in range(total - 1, 0, -1):
            lo, hi = 0, self.ctx.total_steps  # survivors(hi) == 1 <= k
            while lo < hi:
                mid = (lo + hi) // 2
                if self.survivors(mid, total) <= k:
                    hi = mid
                else:
                    lo = mid + 1
            if not out or out[-1][0] != lo:
                out.append((lo, self.survivors(lo, total)))
        return out

    def adaptation_steps(self, run_steps: int) -> list[int]:
        """The steps before ``run_steps`` on which some layer's combinations are cut."""
        totals = {st.table.shape[0] for st in self.state.values()}
        return sorted({step for total in totals for step, _ in self.cuts(total) if step < run_steps})

    # -- declared costs: dense until the first cut, N:M in the switched regime, a share between --------
    @property
    def regime_switch_step(self) -> Optional[int]:
        steps = self.adaptation_steps(self.ctx.total_steps)
        return steps[0] if steps else self.ctx.total_steps

    @torch.no_grad()
    def switch_regime(self) -> None:
        """Cut every group to its best combination now (``bame flops`` measures that regime's step)."""
        for name, layer in self.layers():
            st = self.state[name]
            st.alive = cut_combinations(st.scores, st.alive, 1)
            self._set_mask(layer, st)
        self._settle()

    def transition_plan(self, run_steps: int) -> list[GradientSegment]:
        """From the first cut to ``t_f``: a layer's mask keeps at most ``min(M, sN)`` positions of a group with
        ``s`` alive combinations, ``(min(M, sN) - N) / (M - N)`` of the positions its N:M mask prunes."""
        start = self.regime_switch_step
        if run_steps <= start:
            return []
        bounds = sorted({start, run_steps} | set(s for s in self.adaptation_steps(run_steps) if s > start))
        segments: list[GradientSegment] = []
        for a, b in zip(bounds, bounds[1:]):
            share = {}
            for name, layer in self.layers():
                n, m, total = layer.pattern.n, layer.pattern.m, self.state[name].table.shape[0]
                share[name] = Fraction(min(m, self.survivors(a, total) * n) - n, m - n)
            extend_plan(segments, a, b, share)
        return segments

    # -- per step hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, step: int) -> None:
        super().before_step(step)
        self._ops = 0
        if self.settled:
            return
        for name, layer in self.layers():
            st = self.state[name]
            total = st.table.shape[0]
            survivors = self.survivors(step, total)
            if survivors < total and st.num_alive > st.alive.shape[0] * survivors:
                st.alive = cut_combinations(st.scores, st.alive, survivors)
                self._set_mask(layer, st)
                self._ops += lbc_elementwise_ops(st.alive.shape[0], layer.pattern.n, layer.pattern.m,
                                                 st.num_alive, st.nnz, cutting=True, scoring=False)
        if all(st.num_alive == st.alive.shape[0] for st in self.state.values()):  # one left in every group
            self._settle()

    def _settle(self) -> None:
        """One combination left everywhere: the masks are final and the scores stop learning."""
        for st in self.state.values():
            st.scores.requires_grad_(False)
            st.scores.grad = None
        self.settled = True

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self.settled:
            return
        for name, layer in self.layers():
            st, g = self.state[name], layer.weight.grad
            if g is not None:  # m * G, which is G wherever an alive combination has a position
                st.scores.grad = score_grad(g, layer.weight, st.alive, st.table, layer.layout).to(st.scores.dtype)
                self._ops += lbc_elementwise_ops(st.alive.shape[0], layer.pattern.n, layer.pattern.m, st.num_alive,
                                                 st.nnz, cutting=False)

    def mask_work_ops(self) -> int:
        return self._ops

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per layer the scores and alive flags (the masks follow from them); whether the scores are frozen."""
        return {"version": _STATE_VERSION, "settled": self.settled,
                "layers": {name: {"scores": st.scores.detach().clone(), "alive": st.alive.clone()}
                           for name, st in self.state.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["version"]) != _STATE_VERSION:
            raise ValueError(f"lbc: method state version {state['version']} is not {_STATE_VERSION}")
        saved, layers = state["layers"], dict(self.layers())
        if set(saved) != set(self.state):
            raise ValueError(f"lbc: method state does not match the model's N:M layers: saved {sorted(saved)}, "
                             f"model {sorted(self.state)}")
        for name, s in saved.items():
            st = self.state[name]
            if s["scores"].shape != st.scores.shape:
                raise ValueError(f"lbc: layer {name!r}: saved scores {tuple(s['scores'].shape)} do not fit "
                                 f"{tuple(st.scores.shape)} (another pattern?)")
            st.scores.copy_(s["scores"])  # in place: the optimizer holds this parameter
            st.scores.requires_grad_(True)
            st.alive = s["alive"].to(st.alive.device, torch.bool).clone()
            self._set_mask(layers[name], st)
        self.settled = False
        if bool(state["settled"]):
            self._settle()
