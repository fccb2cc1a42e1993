"""``bame``: N:M training with a sparse backward pass and block-wise mask adaptation (LMA + OBF).

One step (see docs/method.md and bame/bame_core.py for the math):

- ``before_step(t)``: on an adaptation step (``t_i <= t < t_f``, interval condition, a non-zero block
  budget), each layer's ``grad_mask`` is set to every position of its candidate blocks (all non-frozen
  blocks), so the SPARSE backward computes ``g = dL/d(W*m)`` at ``mask | candidates``; otherwise
  ``grad_mask`` is cleared and the weight gradient exists at the mask only.
- ``after_backward(t)``: on an adaptation step, per layer: LMA swap scores per candidate block, block
  selection (top ``rho(t)`` of the layer's blocks), OBF update (oscillation events, EMA frequency,
  freezing); the plan is stored and ``last_adaptation`` describes it. Then (every step) the gradients
  are masked to the *old* mask and the masked weight decay is added (``mask_gradients_and_decay``).
- ``after_optimizer_step(t)``: the plan is applied: the mask swaps, a regrown weight takes its stored
  value (``regrow: stored``) or zero, the optimizer state (momentum) at every swapped position (pruned
  and regrown) restarts at zero, and each group is checked to hold exactly N. ``grad_mask`` is cleared.

With ``score_steps = k > 1`` the ``k - 1`` steps before each adaptation step are scoring steps: their
``grad_mask`` holds the adaptation step's candidates too, ``after_backward`` adds their gradient to a
per-layer sum, and the adaptation step scores from the mean over the window (itself included).

Decisions depend only on weights, masks, gradients and this method's tensors (no RNG), so DDP ranks,
whose gradients are all-reduced before ``after_backward``, decide identically. State lives on the
weight's device and follows it if the model moves after ``prepare``.

A layer whose budget ``rho(t) * num_blocks`` rounds to 0 has no candidates on that step: it would change
nothing, so its dense candidate gradient is not computed at all. If any N:M weight gradient is not finite
on an adaptation step (an fp16 overflow, after which the grad scaler skips the optimizer step), nothing
is selected on that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..autograd import Backward
from ..bame_core import (OBFState, adaptation_elementwise_ops, apply_swaps, block_swaps, effective_frequency,
                         gradient_grow_scale, obf_step, select_blocks, selection_budget)
from ..layers import NMLayer
from ..nm import BlockGrid, block_grid, from_blocks, is_nm, to_blocks
from ..schedule import is_adaptation_step, resolve_interval, resolve_window, rho_at
from .base import AdaptationRecord, LayerAdaptation, register
from .static import Static

__all__ = ["Bame"]

_STATE_VERSION = 1


@dataclass
class _Plan:
    """One layer's pending swaps, in the weight's shape (between after_backward and after_optimizer_step)."""

    drop: torch.Tensor  # bool: kept weights to prune
    grow: torch.Tensor  # bool: pruned weights to enable


@register("bame")
class Bame(Static):
    """BAME: static N:M training plus loss-aware, oscillation-aware block mask adaptation in ``[t_i, t_f)``."""

    backward_mode: Backward = Backward.SPARSE
    config_sections = ("bame",)

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        b = cfg.bame
        self.bcfg = b
        self.t_i, self.t_f = resolve_window(b.t_i_steps, b.t_i_fraction, b.t_f_steps, b.t_f_fraction,
                                            ctx.total_steps)
        self.interval = resolve_interval(b.interval_steps, b.interval_fraction, ctx.total_steps)  # T in steps
        if b.score_steps > self.interval:
            raise ValueError(f"bame: method.bame.score_steps={b.score_steps} is longer than the adaptation interval "
                             f"T={self.interval} steps: scoring windows would overlap; lower score_steps or raise T")
        self.grids: dict[str, BlockGrid] = {}
        self.obf: dict[str, OBFState] = {}
        self.last_score: dict[str, torch.Tensor] = {}  # [B] R_b at the last adaptation (nan: not a candidate)
        self.adaptations = 0  # adaptation steps run so far
        self.last_adaptation_step = -1
        self._budgets: Optional[dict[str, int]] = None  # set by before_step on an adaptation step
        self._plans: dict[str, _Plan] = {}
        # layer -> (id, _version) of its grad_mask right after this method cleared it: a grad_mask still
        # at that version is all False, and is not cleared again (an in-place write would bump its version
        # and invalidate the layers' cached counts for nothing, every step)
        self._cleared: dict[str, tuple[int, int]] = {}
        # score_steps > 1: the candidate gradients of the scoring window so far (summed), and how many steps
        self._score_sum: dict[str, torch.Tensor] = {}
        self._score_count = 0
        self._candidates: Optional[dict[str, int]] = None  # this step's candidate budgets (None: no candidates)

    # -- set-up --------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        b = self.bcfg
        for name, layer in self.layers():
            try:
                grid = block_grid(layer.weight.shape, layer.pattern.m, b.block_rows, b.block_groups, layer.layout)
            except ValueError as err:
                raise ValueError(f"bame: layer {name!r}: {err}") from None
            self.grids[name] = grid
            self.obf[name] = OBFState.initial(grid.num_blocks, grid.groups_per_block, grid.m, layer.weight.device)
            self.last_score[name] = torch.full((grid.num_blocks,), float("nan"), device=layer.weight.device)
        return model

    def _state(self, name: str, layer: NMLayer) -> OBFState:
        """The layer's OBF state, moved to the weight's device if the model moved since ``prepare``."""
        st = self.obf[name]
        if st.frequency.device != layer.weight.device:
            st = self.obf[name] = st.to(layer.weight.device)
            self.last_score[name] = self.last_score[name].to(layer.weight.device)
        return st

    # -- schedule ------------------------------------------------------------------------------
    def is_adaptation_step(self, step: int) -> bool:
        b = self.bcfg
        return is_adaptation_step(step, self.t_i, self.t_f, self.interval, b.interval_anchor)

    def rho_at(self, step: int) -> float:
        return rho_at(step, self.bcfg.rho, self.t_i, self.t_f, self.bcfg.rho_decay)

    def budgets(self, step: int) -> dict[str, int]:
        """Blocks each layer may change at ``step`` (all 0 off the adaptation steps)."""
        rho = self.rho_at(step) if self.is_adaptation_step(step) else 0.0
        return {name: selection_budget(rho, grid.num_blocks, self.bcfg.rho_rounding)
                for name, grid in self.grids.items()}

    def scoring_target(self, step: int) -> Optional[int]:
        """The adaptation step whose scores use ``step``'s candidate gradient (``step`` itself on an
        adaptation step; the ``score_steps - 1`` steps before it too), or None."""
        for ahead in range(self.bcfg.score_steps):
            if self.is_adaptation_step(step + ahead):
                return step + ahead
        return None

    def candidate_budgets(self, step: int) -> Optional[dict[str, int]]:
        """Per layer, the block budget of the adaptation step ``step`` scores for (None when it scores for
        none): a layer with a non-zero budget computes its candidate blocks' weight gradient at ``step``."""
        target = self.scoring_target(step)
        return None if target is None else self.budgets(target)

    def _freezes(self) -> bool:
        return self.bcfg.obf and self.bcfg.selection == "freeze_then_topk"

    # -- per step hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, step: int) -> None:
        super().before_step(step)
        self._plans = {}
        self._candidates = self.candidate_budgets(step)
        self._budgets = self._candidates if self.is_adaptation_step(step) else None
        for name, layer in self.layers():
            if self._candidates is not None and self._candidates[name] > 0:
                candidates = ~self._state(name, layer).frozen
                layer.grad_mask.copy_(self._expand(name, layer, candidates))
            else:
                self._clear_grad_mask(name, layer)

    def _clear_grad_mask(self, name: str, layer: NMLayer) -> None:
        gm = layer.grad_mask
        if self._cleared.get(name) != (id(gm), gm._version):
            gm.zero_()
            self._cleared[name] = (id(gm), gm._version)

    def _expand(self, name: str, layer: NMLayer, per_block: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> the weight's shape: every position of block ``b`` takes ``per_block[b]``."""
        grid = self.grids[name]
        blocks = per_block.view(-1, 1, 1).expand(grid.num_blocks, grid.groups_per_block, grid.m)
        return from_blocks(blocks, grid, layer.weight.shape, layer.layout)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self._budgets is not None:
            self.last_adaptation = self._adapt(step, self._budgets)
        elif self._candidates is not None:
            self._accumulate_scores(self._candidates)
        self.mask_gradients_and_decay()

    def _accumulate_scores(self, budgets: dict[str, int]) -> None:
        """A scoring step before the adaptation step: keep the candidates' gradient (skipped on an fp16
        overflow, as the grad scaler skips the step)."""
        if not self._gradients_finite():
            return
        for name, layer in self.layers():
            g = layer.weight.grad
            if budgets[name] > 0 and g is not None:
                acc = self._score_sum.get(name)
                self._score_sum[name] = g.detach().clone() if acc is None else acc.add_(g)
        self._score_count += 1

    def _scoring_gradient(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """This step's gradient, or with ``score_steps > 1`` its mean with the window's earlier ones."""
        acc = self._score_sum.get(name)
        if acc is None:
            return g
        return (acc + g) / (self._score_count + 1)

    def _adapt(self, step: int, budgets: dict[str, int]) -> AdaptationRecord:
        """Score, select and track oscillations in every layer; store the plans; describe them."""
        b = self.bcfg
        record = AdaptationRecord(step=step, rho=self.rho_at(step))
        if not self._gradients_finite():
            # fp16 overflow: the grad scaler skips this optimizer step; the mask is left alone too.
            budgets = {name: 0 for name in budgets}
        for name, layer in self.layers():
            grid, st = self.grids[name], self._state(name, layer)
            budget = budgets[name]
            w, g = layer.weight.detach(), layer.weight.grad
            if g is not None:
                g = self._scoring_gradient(name, g)
            if budget == 0 or g is None:
                self.last_score[name] = torch.full_like(self.last_score[name], float("nan"))
                record.layers.append(self._layer_record(name, grid, st, 0, 0, 0, 0, None))
                continue
            wb, gb, mb = (to_blocks(t, grid, layer.layout) for t in (w, g, layer.mask))
            candidates = ~st.frozen
            scale = gradient_grow_scale(w, layer.mask) if b.lma == "gradient" else None
            swaps = block_swaps(wb, gb, mb, layer.pattern.n, b.lma, b.swaps_per_block, scale)
            selected = select_blocks(swaps.score, candidates, st.frozen, st.frequency, budget, b.selection,
                                     b.joint_lambda)
            new_mb = apply_swaps(mb, swaps.drop, swaps.grow, selected)
            new_st, events = obf_step(st, mb, new_mb, candidates, b.beta, b.tau, b.min_changes, b.obf_update,
                                      freeze=self._freezes(), bias_correction=b.obf_bias_correction)
            self.obf[name] = new_st
            score = torch.where(candidates, swaps.score, torch.full_like(swaps.score, float("nan")))
            self.last_score[name] = score.float()
            sel = selected.view(-1, 1, 1)
            self._plans[name] = _Plan(drop=self._blocks_to_weight(name, layer, swaps.drop & sel),
                                      grow=self._blocks_to_weight(name, layer, swaps.grow & sel))
            n_sel = int(selected.sum())
            n_swaps = int((swaps.num_swaps * selected).sum())
            n_cand = int(candidates.sum())
            n_updated = n_sel if b.obf_update == "changed" else n_cand
            ops = adaptation_elementwise_ops(n_cand, grid.groups_per_block, grid.m, layer.pattern.n,
                                             b.swaps_per_block, b.lma, b.selection, n_sel, n_updated,
                                             layer_numel=w.numel())
            record.scoring_elementwise_ops += ops
            record.layers.append(self._layer_record(name, grid, new_st, n_cand, n_sel, n_swaps,
                                                    int(events.sum()), score[candidates]))
        self.adaptations += 1
        self.last_adaptation_step = step
        self._score_sum, self._score_count = {}, 0
        return record

    def _gradients_finite(self) -> bool:
        """One host sync: every N:M weight gradient is finite."""
        flags = [torch.isfinite(layer.weight.grad).all() for _, layer in self.layers()
                 if layer.weight.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def _blocks_to_weight(self, name: str, layer: NMLayer, blocks: torch.Tensor) -> torch.Tensor:
        return from_blocks(blocks, self.grids[name], layer.weight.shape, layer.layout)

    def _layer_record(self, name: str, grid: BlockGrid, st: OBFState, candidates: int, selected: int,
                      swaps: int, events: int, scores: Optional[torch.Tensor]) -> LayerAdaptation:
        stats: dict[str, float] = {}
        if scores is not None:
            finite = scores[torch.isfinite(scores)]
            if finite.numel():
                stats = {"mean": float(finite.mean()), "max": float(finite.max())}
        b = self.bcfg
        return LayerAdaptation(
            layer=name, num_blocks=grid.num_blocks, candidate_blocks=candidates,
            frozen_blocks=int(st.frozen.sum()), selected_blocks=selected, swaps=swaps, oscillation_events=events,
            score_stats=stats,
            frequency=effective_frequency(st, b.beta, b.obf_bias_correction).detach().cpu().clone(),
            frozen=st.frozen.detach().cpu().clone(), last_score=self.last_score[name].detach().cpu().clone(),
            changes=st.changes.detach().cpu().clone())

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for name, layer in self.layers():
            plan = self._plans.get(name)
            if plan is not None:
                self._apply(name, layer, plan)
            if self._budgets is not None:
                self._clear_grad_mask(name, layer)
        self._plans = {}
        self._budgets = None

    def _apply(self, name: str, layer: NMLayer, plan: _Plan) -> None:
        new_mask = (layer.mask & ~plan.drop) | plan.grow
        n, m = layer.pattern.n, layer.pattern.m
        if not is_nm(new_mask, n, m, layer.layout, exact=True):
            raise RuntimeError(f"bame: layer {name!r} of shape {tuple(layer.weight.shape)}: mask after the swaps "
                               f"does not keep exactly {n} of every {m} (a swap plan is inconsistent)")
        if self.bcfg.regrow == "zero":
            layer.weight.masked_fill_(plan.grow, 0)
        self.reset_optimizer_state(layer.weight, plan.drop | plan.grow)
        layer.mask.copy_(new_mask)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per layer: frequency, EMA update counts, change counts, frozen flags, previous block states,
        last scores; and the step counters. All tensors (masks ride in the model's state dict)."""
        if self._plans:
            raise RuntimeError("bame: state_dict between after_backward and after_optimizer_step would lose "
                               "the pending swaps; checkpoint at the end of a step")
        layers = {}
        for name, st in self.obf.items():
            layers[name] = {"frequency": st.frequency, "updates": st.updates, "changes": st.changes,
                            "frozen": st.frozen, "prev_state": st.prev_state, "has_prev": st.has_prev,
                            "last_score": self.last_score[name]}
            if name in self._score_sum:  # mid-way through a scoring window (score_steps > 1)
                layers[name]["score_sum"] = self._score_sum[name]
        return {"version": torch.tensor(_STATE_VERSION),
                "adaptations": torch.tensor(self.adaptations),
                "last_adaptation_step": torch.tensor(self.last_adaptation_step),
                "score_count": torch.tensor(self._score_count),
                "window": torch.tensor([self.t_i, self.t_f]),
                "layers": {k: {kk: vv.detach().clone() for kk, vv in v.items()} for k, v in layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["version"]) != _STATE_VERSION:
            raise ValueError(f"bame: method state version {int(state['version'])} != {_STATE_VERSION}")
        layers = dict(self.layers())
        missing, extra = set(self.obf) - set(state["layers"]), set(state["layers"]) - set(self.obf)
        if missing or extra:
            raise ValueError(f"bame: method state does not match the model's N:M layers: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, s in state["layers"].items():
            device = layers[name].weight.device
            old = self.obf[name]
            new = OBFState(s["frequency"], s["updates"], s["changes"], s["frozen"], s["prev_state"],
                           s["has_prev"]).to(device)
            for a, c in zip(old.tensors(), new.tensors()):
                if a.shape != c.shape or a.dtype != c.dtype:
                    raise ValueError(f"bame: layer {name!r}: saved state {tuple(c.shape)} {c.dtype} does not fit "
                                     f"{tuple(a.shape)} {a.dtype} (different block size or pattern?)")
            self.obf[name] = new
            self.last_score[name] = s["last_score"].to(device)
        self._score_sum = {name: s["score_sum"].to(layers[name].weight.device)
                           for name, s in state["layers"].items() if "score_sum" in s}
        self._score_count = int(state.get("score_count", 0))
        self.adaptations = int(state["adaptations"])
        self.last_adaptation_step = int(state["last_adaptation_step"])
        self._plans, self._budgets, self._candidates = {}, None, None
