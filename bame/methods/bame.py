"""``bame``: N:M training with a sparse backward pass and block-wise mask adaptation (LMA + OBF).

One step (see docs/method.md and bame/bame_core.py for the math):

- ``before_step(t)``: sets each layer's ``grad_mask``, the positions beyond the mask whose weight
  gradient the SPARSE backward computes: on an adaptation step (``t_i <= t < t_f``, interval condition,
  a non-zero block budget) every position of the candidate blocks (all non-frozen blocks); under the
  ``window`` reading also every position of the designated blocks; nothing otherwise.
- ``after_backward(t)``: on an adaptation step, per layer: the blocks whose mask is re-chosen and how
  (LMA swap or top-N magnitude), the OBF update (oscillation events, EMA frequency, freezing) and, under
  ``window``, the blocks designated for the next window; the plan is stored and ``last_adaptation``
  describes it. Then (every step) the gradients are masked to the positions that may move (the *old*
  mask; under ``pruned_update: train`` also the designated blocks' pruned weights) and the masked weight
  decay is added (``mask_gradients_and_decay``).
- ``after_optimizer_step(t)``: the plan is applied: the mask changes, a regrown weight takes its stored
  value (``regrow: stored``) or zero, the optimizer state (momentum) restarts at zero where it must (see
  below), and each group is checked to hold exactly N.

Two families of readings (docs/method.md):

- ``designated_grad: adaptation`` (the first family): at an adaptation step the top ``rho(t)`` blocks by
  LMA score (``designation: topk``; every non-frozen block with ``progressive``) are re-chosen at once;
  pruned weights never move. Momentum restarts at both ends of every change.
- ``designated_grad: window`` with ``pruned_update: train`` (blocks that learn): the blocks designated at
  adaptation step ``t_k`` compute their full weight gradient on every step ``t_k < t <= t_{k+1}`` (the
  next adaptation step, or ``t_f``, the *settle* step, when there is none) and their pruned weights take
  the optimizer update from it (with ``pruned_decay``, SR-STE's ``lambda_w (1 - m) W`` inside them). At
  ``t_{k+1}`` their masks are re-chosen from the trained weights (their best LMA swap where it gains, or
  the top-N ``|W|`` of each group), A->B->A changes feed OBF, and the next designation follows on the
  re-chosen masks. With ``progressive`` every non-frozen block is designated and no candidate gradient
  is needed beyond the designated blocks'. Momentum restarts wherever a weight leaves the set of weights
  that move (pruned and not designated); a regrown weight that was training keeps its momentum.

With ``score_steps = k > 1`` the ``k - 1`` steps before each adaptation step are scoring steps: their
``grad_mask`` holds the adaptation step's candidates too, ``after_backward`` adds their gradient to a
per-layer sum, and the adaptation step scores from the mean over the window (itself included).

Decisions depend only on weights, masks, gradients and this method's tensors (no RNG), so DDP ranks,
whose gradients are all-reduced before ``after_backward``, decide identically. State lives on the
weight's device and follows it if the model moves after ``prepare``.

A layer whose budget ``rho(t) * num_blocks`` rounds to 0 has no candidates on that step: it would change
nothing, so its dense candidate gradient is not computed at all. If any N:M weight gradient is not finite
on an adaptation step (an fp16 overflow, after which the grad scaler skips the optimizer step), no mask
changes on that step and the designation stays as it was (it ends at the settle step).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch
from torch import nn

from ..autograd import Backward
from ..bame_core import (DESIGNATED_GRADS, DESIGNATIONS, LMA_SCORES, OBF_UPDATES, PRUNED_UPDATES, REGROW_RULES,
                         REGROW_VALUES, ROUNDINGS, SELECTIONS, BlockSwaps, OBFState, adaptation_elementwise_ops,
                         apply_swaps, block_equal, block_swaps, effective_frequency, gradient_grow_scale,
                         magnitude_blocks, magnitude_elementwise_ops, obf_elementwise_ops, obf_step, select_blocks,
                         selection_budget)
from ..contract import TRANSPOSABLE
from ..layers import NMLayer
from ..nm import BlockGrid, block_grid, from_blocks, is_nm, to_blocks
from ..schedule import (INTERVAL_ANCHORS, RHO_DECAYS, adaptation_steps, coalesce_segments, is_adaptation_step,
                        overlay_segments,
                        resolve_interval, resolve_window, rho_at)
from ..schema import ConfigError, Section, at_least, choice
from ..transposable import (block_exchange_elementwise_ops, block_exchanges, check_block_shape, is_transposable_nm,
                             transposable_blocks)
from .base import AdaptationRecord, FlopsBudget, GradientSegment, LayerAdaptation, extend_plan, register
from .static import Static

__all__ = ["Bame", "BameConfig"]

_STATE_VERSION = 2  # 2: per-layer 'designated' blocks (version 1 checkpoints load with none designated)


@dataclass(frozen=True)
class BameConfig(Section):
    """BAME's readings of method.md; every default is a hypothesis (see docs/results.md)."""

    block_rows: int = 1  # a block is block_rows x block_groups groups of M
    block_groups: int = 1
    t_i_fraction: float = 0.0  # adaptation window start, as a fraction of training steps
    t_i_steps: Optional[int] = None  # ... or in steps (overrides the fraction)
    t_f_fraction: float = 0.5  # adaptation window end (mask fixed afterwards)
    t_f_steps: Optional[int] = None
    interval_steps: int = 100  # T: adapt once every T steps inside [t_i, t_f)
    # ... or T as a fraction of training steps: T = max(1, round_half_up(fraction * total_steps));
    # when set, it replaces interval_steps (so a config that sets interval_steps can switch with one --set)
    interval_fraction: Optional[float] = None
    # 'absolute': adapt where step % T == 0 (method.md); 't_i': where (step - t_i) % T == 0
    interval_anchor: str = choice(*INTERVAL_ANCHORS, default="absolute")
    # Regrowth/drop score. 'gradient' (RigL-style regrowth by |g_j|) is the default: on Fashion-MNIST 1:16 it
    # beat 'taylor' by 1.5 points over 3 seeds and tied the static mask (docs/results.md).
    lma: str = choice(*LMA_SCORES, default="gradient")
    obf: bool = True  # oscillation-aware block freezing
    beta: float = 0.9  # EMA decay of the oscillation frequency
    # which blocks get the EMA update on an adaptation step: 'changed' (only blocks whose mask changed;
    # f_b is then the recent share of a block's changes that were oscillations) or 'candidates' (every
    # candidate block, event 0 when it did not oscillate; f_b is then oscillations per adaptation)
    obf_update: str = choice(*OBF_UPDATES, default="changed")
    obf_bias_correction: bool = False  # compare f_b / (1 - beta^updates) with tau (Adam-style), not f_b
    tau: float = 0.5  # freeze a block once its frequency (in [0, 1]) >= tau, tau in (0, 1] ...
    min_changes: int = 2  # ... and it has changed at least this often
    selection: str = choice(*SELECTIONS, default="freeze_then_topk")
    joint_lambda: float = 1.0  # selection 'joint': rank by R_b / (1 + lambda f_b)
    # fraction of a layer's blocks changed per adaptation ... 0.0125, not method.md's 0.05: on Fashion-MNIST 1:16
    # over 10 epochs 0.05 lost 0.53 points to the static mask and 0.0125 0.07; over 3 epochs they tied
    # (docs/results.md). At a fixed T in steps a longer schedule adapts more often: fewer swaps per step.
    rho: float = 0.0125
    rho_decay: str = choice(*RHO_DECAYS, default="cosine")  # ... decayed to 0 at t_f
    # blocks selected per layer = rounding(rho(t) * num_blocks): 'round' (half up), 'ceil', 'floor'
    rho_rounding: str = choice(*ROUNDINGS, default="round")
    swaps_per_block: int = 1
    # LMA scores from the mean candidate gradient of the last score_steps steps up to and including the
    # adaptation step (1: that step's mini-batch only, method.md). Candidate blocks get their dense weight
    # gradient on each of those steps (counted by the ledger); at most T.
    score_steps: int = 1
    regrow: str = choice(*REGROW_VALUES, default="stored")  # value of a regrown weight
    # -- the second family: designated blocks that learn (docs/method.md, "Blocks that learn") --------
    # Which blocks compute their full weight gradient: 'adaptation' (the candidates, on adaptation steps
    # only) or 'window' (the blocks designated at an adaptation step, on every step up to and including the
    # next adaptation step, or t_f).
    designated_grad: str = choice(*DESIGNATED_GRADS, default="adaptation")
    # 'frozen': pruned weights keep their stored value; 'train': the pruned weights of designated blocks
    # take the optimizer update (momentum, masked weight decay) from that gradient (needs 'window').
    pruned_update: str = choice(*PRUNED_UPDATES, default="frozen")
    # SR-STE's refined decay lambda_w (1 - m) W on the pruned weights of designated blocks ('train' only);
    # None: method.srste_decay; 0: off
    pruned_decay: Optional[float] = None
    # How a block's mask is re-chosen: 'lma' (its best LMA swap) or 'magnitude' (top-N |W| of each group)
    regrow_rule: str = choice(*REGROW_RULES, default="lma")
    # Which blocks are designated: 'topk' (the top rho(t) of a layer by LMA score) or 'progressive' (every
    # non-frozen block; OBF freezing shrinks the set; rho is unused)
    designation: str = choice(*DESIGNATIONS, default="topk")

    def problems(self, method: Any) -> list[tuple[str, str]]:
        """The ranges and pairings types cannot express; each message says what to write instead."""
        out = []
        for key in ("t_i_fraction", "t_f_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                out.append((key, f"must lie in [0, 1] (a fraction of training), got {getattr(self, key)}"))
        out += at_least(self, ("t_i_steps", "t_f_steps"), 0, " (a 0-based optimizer step)")
        if self.t_i_steps is None and self.t_f_steps is None and self.t_i_fraction > self.t_f_fraction:
            out.append(("t_i_fraction", f"t_i ({self.t_i_fraction}) is after t_f ({self.t_f_fraction})"))
        if self.t_i_steps is not None and self.t_f_steps is not None and self.t_i_steps > self.t_f_steps:
            out.append(("t_i_steps", f"t_i_steps ({self.t_i_steps}) is after t_f_steps ({self.t_f_steps})"))
        out += at_least(self, ("interval_steps", "block_rows", "block_groups", "swaps_per_block", "score_steps"), 1)
        if self.interval_fraction is not None and not 0.0 < self.interval_fraction <= 1.0:
            out.append(("interval_fraction", f"must lie in (0, 1] (T as a fraction of training steps), "
                        f"got {self.interval_fraction}"))
        p = method.pattern
        if method.mask_structure == TRANSPOSABLE:
            for q in dict.fromkeys(q for q in method.rule_patterns if not q.is_dense):  # each pattern once
                try:
                    check_block_shape(self.block_rows, q.m)
                except ValueError as err:
                    out.append(("block_rows", f"{err} (pattern {q})"))
                    break
        elif self.swaps_per_block > min(p.n, p.m - p.n) * self.block_rows * self.block_groups:
            out.append(("swaps_per_block", f"{self.swaps_per_block} swaps cannot fit in a block of "
                        f"{self.block_rows}x{self.block_groups} groups of {p}"))
        if not 0.0 < self.beta < 1.0:
            out.append(("beta", f"must lie in (0, 1), got {self.beta}"))
        if not 0.0 < self.tau <= 1.0:
            out.append(("tau", f"must lie in (0, 1], got {self.tau}: a block's oscillation frequency is an EMA of "
                        f"0/1 events, so tau > 1 never freezes (to turn freezing off set method.bame.obf=false) and "
                        f"tau <= 0 freezes every block after min_changes changes"))
        out += at_least(self, ("min_changes",), 0)
        if self.joint_lambda < 0:
            out.append(("joint_lambda", f"must be >= 0 (0 ranks by R_b alone), got {self.joint_lambda}"))
        if not 0.0 <= self.rho <= 1.0:
            out.append(("rho", f"must lie in [0, 1], got {self.rho}"))
        if self.designated_grad == "window" and self.pruned_update != "train":
            out.append(("designated_grad", "'window' computes the designated blocks' full weight gradient on "
                        "every step, which only method.bame.pruned_update=train uses: set pruned_update=train (or "
                        "designated_grad=adaptation)"))
        if self.pruned_update == "train" and self.designated_grad != "window":
            out.append(("pruned_update", "'train' needs method.bame.designated_grad=window (with 'adaptation' "
                        "the designated blocks have a gradient on one step only)"))
        if self.pruned_decay is not None and self.pruned_decay < 0:
            out.append(("pruned_decay", f"must be >= 0 or null (method.srste_decay), got {self.pruned_decay}"))
        return out


@dataclass
class _Plan:
    """One layer's pending change, applied by after_optimizer_step."""

    new_mask: torch.Tensor  # bool, the weight's shape: the mask after this adaptation
    designated: torch.Tensor  # [B] bool: the blocks designated for the next window (all False: none)


@dataclass
class _LayerDecision:
    """What ``_decide`` chose for one layer (block form), and what it cost."""

    new_blocks: torch.Tensor  # [B, G, m] bool: the mask after the re-choice
    state: OBFState  # OBF state after this adaptation
    events: torch.Tensor  # [B] bool: oscillation events
    designated: torch.Tensor  # [B] bool: designated for the next window
    scored: torch.Tensor  # [B] bool: blocks with a full gradient on this step (candidates + designated)
    score: torch.Tensor  # [B] R_b recorded for the recorders (nan where not scored)
    ops: int  # element-wise work of scoring, selection, re-choice and OBF


@register("bame", config=BameConfig)
class Bame(Static):
    """BAME: static N:M training plus loss-aware, oscillation-aware block mask adaptation in ``[t_i, t_f)``."""

    backward_mode = Backward.SPARSE

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
        self.window = b.designated_grad == "window"
        self.train_pruned = b.pruned_update == "train"
        self.pruned_decay = float(cfg.srste_decay if b.pruned_decay is None else b.pruned_decay)
        # Candidates (every non-frozen block) compute their full gradient on adaptation steps so that LMA can
        # score them; 'progressive' under 'window' designates every non-frozen block anyway and scores only
        # the designated ones, so it needs no candidates.
        self.scores_candidates = not (self.window and b.designation == "progressive")
        # 'window' + 'magnitude' re-chooses the designated blocks at the start of the adaptation step, from the
        # weights the previous step left (as SR-STE refreshes its mask after each update): no gradient needed
        self.rechoose_at_start = self.window and b.regrow_rule == "magnitude"
        self.grids: dict[str, BlockGrid] = {}
        self.obf: dict[str, OBFState] = {}
        self.last_score: dict[str, torch.Tensor] = {}  # [B] R_b at the last adaptation (nan: not scored)
        self.designated: dict[str, torch.Tensor] = {}  # [B] bool: blocks designated for the current window
        self._designated_positions: dict[str, Optional[torch.Tensor]] = {}  # the weight's shape (None: none)
        self.adaptations = 0  # adaptation steps run so far
        self.last_adaptation_step = -1
        self._budgets: Optional[dict[str, int]] = None  # set by before_step on an adaptation / settle step
        self._plans: dict[str, _Plan] = {}
        # layer -> (id, _version, what) of its grad_mask right after this method wrote it: a grad_mask still at
        # that version holds 'what' and is not written again (an in-place write would bump its version and
        # invalidate the layers' cached counts for nothing, every step)
        self._written: dict[str, tuple] = {}
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
                if layer.transposable:
                    check_block_shape(b.block_rows, layer.pattern.m)
            except ValueError as err:
                raise ValueError(f"bame: layer {name!r}: {err}") from None
            device = layer.weight.device
            self.grids[name] = grid
            self.obf[name] = OBFState.initial(grid.num_blocks, grid.groups_per_block, grid.m, device)
            self.last_score[name] = torch.full((grid.num_blocks,), float("nan"), device=device)
            self.designated[name] = torch.zeros(grid.num_blocks, dtype=torch.bool, device=device)
            self._designated_positions[name] = None
        return model

    def _state(self, name: str, layer: NMLayer) -> OBFState:
        """The layer's OBF state, moved to the weight's device if the model moved since ``prepare``."""
        st = self.obf[name]
        if st.frequency.device != layer.weight.device:
            device = layer.weight.device
            st = self.obf[name] = st.to(device)
            self.last_score[name] = self.last_score[name].to(device)
            self.designated[name] = self.designated[name].to(device)
            held = self._designated_positions[name]
            self._designated_positions[name] = None if held is None else held.to(device)
        return st

    @classmethod
    def flops_budget(cls, cfg: Any) -> FlopsBudget:
        """``rho`` (``designation: topk``) or ``t_f_fraction`` (``progressive``): an upper bound before training."""
        b = cfg.bame
        if b.designation == "progressive":
            if b.t_f_steps is not None:
                raise ConfigError(["bame flops --target-ratio: method.bame.t_f_steps is set; the budget of "
                                   "'progressive' is t_f_fraction, so unset t_f_steps (--set method.bame.t_f_steps=null)"])
            low = 0.0 if b.t_i_steps is not None else b.t_i_fraction
            return FlopsBudget("method.bame.t_f_fraction", low, 1.0, "an upper bound before training: OBF freezing "
                               "can only lower it (the run's ledger gives the count)")
        return FlopsBudget("method.bame.rho", 0.0, 1.0,
                           "an upper bound before training: blocks designated only where LMA finds a gain, and "
                           "freezing, can only lower it (the run's ledger gives the count)",
                           " (rho decays to 0 at t_f: raise method.bame.t_f_fraction or set "
                           "method.bame.rho_decay=constant)")

    # -- schedule ------------------------------------------------------------------------------
    def is_adaptation_step(self, step: int) -> bool:
        b = self.bcfg
        return is_adaptation_step(step, self.t_i, self.t_f, self.interval, b.interval_anchor)

    def adaptation_steps(self, run_steps: int) -> list[int]:
        """The adaptation steps before ``run_steps``, and under ``window`` the settle step ``t_f`` after them."""
        steps = adaptation_steps(self.t_i, self.t_f, self.interval, self.bcfg.interval_anchor)
        if self.window and steps:
            steps.append(self.t_f)
        return [s for s in steps if s < run_steps]

    def is_settle_step(self, step: int) -> bool:
        """Under ``window``: ``t_f``, where the blocks designated last are re-chosen and the designation ends."""
        return self.window and step == self.t_f

    def rho_at(self, step: int) -> float:
        return rho_at(step, self.bcfg.rho, self.t_i, self.t_f, self.bcfg.rho_decay)

    def budgets(self, step: int) -> dict[str, int]:
        """Blocks each layer may designate at ``step``: ``rho(t)`` of its blocks (``topk``) or all of them
        (``progressive``) on adaptation steps, 0 elsewhere."""
        if not self.is_adaptation_step(step):
            return {name: 0 for name in self.grids}
        if self.bcfg.designation == "progressive":
            return {name: grid.num_blocks for name, grid in self.grids.items()}
        rho = self.rho_at(step)
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
        if not self.scores_candidates:
            return None
        target = self.scoring_target(step)
        return None if target is None else self.budgets(target)

    def gradient_plan(self, run_steps: int) -> list[GradientSegment]:
        """The share of each layer's blocks computing their full weight gradient beyond the mask, by step
        segment, in the first ``run_steps`` steps, if no block freezes and every budget is filled: exact for
        the first family (its candidates are every block), an upper bound for ``window``."""
        whole = {name: grid.num_blocks for name, grid in self.grids.items()}
        adapts = adaptation_steps(self.t_i, self.t_f, self.interval, self.bcfg.interval_anchor)
        scoring: list[tuple[int, int, dict[str, int]]] = []  # each adaptation step's scoring window: candidates
        if self.scores_candidates:
            for a in adapts:
                blocks = {name: whole[name] if k > 0 else 0 for name, k in self.budgets(a).items()}
                scoring.append((max(0, a - self.bcfg.score_steps + 1), a + 1, blocks))
        designated: list[tuple[int, int, dict[str, int]]] = []  # each designation's steps
        if self.window:
            # lma: designated after the backward of a, computing on a+1 .. the next adaptation step (its scores);
            # magnitude: re-chosen at the start of the next one, so a+1 .. before it (progressive: from a itself)
            first = 0 if self.rechoose_at_start and self.bcfg.designation == "progressive" else 1
            last = 0 if self.rechoose_at_start else 1
            progressive = self.bcfg.designation == "progressive"  # every block on every adaptation step
            designated = [(a + first, end + last, whole if progressive else self.budgets(a))
                          for a, end in zip(adapts, adapts[1:] + [self.t_f])]
        segments: list[GradientSegment] = []
        for start, stop, blocks in overlay_segments(coalesce_segments(scoring), coalesce_segments(designated),
                                                    run_steps):
            extend_plan(segments, start, stop, {n: Fraction(k, whole[n]) for n, k in blocks.items()})
        return segments

    # -- per step hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, step: int) -> None:
        super().before_step(step)
        self._plans = {}
        self._candidates = self.candidate_budgets(step)
        adapting = self.is_adaptation_step(step) or (
            self.is_settle_step(step) and any(bool(d.any()) for d in self.designated.values()))
        self._budgets = self.budgets(step) if adapting else None
        if adapting and self.rechoose_at_start:
            self.last_adaptation = self._rechoose_by_magnitude(step)
        for name, layer in self.layers():
            st = self._state(name, layer)
            held = self._designated_positions[name]
            if self._candidates is not None and self._candidates[name] > 0:
                positions = self._expand(name, layer, ~st.frozen)
                self._write_grad_mask(name, layer, positions if held is None else positions | held, ("step", step))
            elif held is not None:
                self._write_grad_mask(name, layer, held, ("designated", id(held)))
            else:
                self._write_grad_mask(name, layer, None, ("clear",))

    def _write_grad_mask(self, name: str, layer: NMLayer, positions: Optional[torch.Tensor], what: tuple) -> None:
        gm = layer.grad_mask
        if self._written.get(name) == (id(gm), gm._version, what):
            return
        if positions is None:
            gm.zero_()
        else:
            gm.copy_(positions)
        self._written[name] = (id(gm), gm._version, what)

    def _expand(self, name: str, layer: NMLayer, per_block: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> the weight's shape: every position of block ``b`` takes ``per_block[b]``."""
        grid = self.grids[name]
        blocks = per_block.view(-1, 1, 1).expand(grid.num_blocks, grid.groups_per_block, grid.m)
        return from_blocks(blocks, grid, layer.weight.shape, layer.layout)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self._budgets is not None and self.rechoose_at_start:
            if self.bcfg.designation == "topk" and step < self.t_f:
                self._designate_by_score(step, self._budgets)
        elif self._budgets is not None:
            self.last_adaptation = self._adapt(step, self._budgets)
        elif self._candidates is not None:
            self._accumulate_scores(self._candidates)
        self.mask_gradients_and_decay()

    @torch.no_grad()
    def mask_gradients_and_decay(self) -> None:
        """grad <- (grad + wd W [+ pruned_decay (1 - m) W inside designated blocks]) * U, with U the mask and,
        under ``pruned_update: train``, the designated blocks: nothing outside U moves. (AdamW: no ``wd W``;
        its optimizer decays the weights at U.)"""
        if not self.train_pruned:
            super().mask_gradients_and_decay()
            return
        wd = 0.0 if self.ctx.decoupled_decay else self.ctx.weight_decay
        for name, layer in self.layers():
            w, held = layer.weight, self._designated_positions[name]
            if w.grad is None:
                continue
            if held is None:
                if wd:
                    w.grad.add_(w, alpha=wd)
                w.grad.mul_(layer.mask)
                continue
            # SR-STE's order: the refined decay joins the gradient first (in its backward), the optimizer's after
            if self.pruned_decay:
                w.grad.add_(w * (held & ~layer.mask), alpha=self.pruned_decay)
            if wd:
                w.grad.add_(w, alpha=wd)
            w.grad.mul_(layer.mask | held)

    def update_positions(self) -> dict[torch.Tensor, torch.Tensor]:
        """The mask, and under ``pruned_update: train`` the designated blocks too (their pruned weights train)."""
        out = {}
        for name, layer in self.layers():
            held = self._designated_positions[name] if self.train_pruned else None
            out[layer.weight] = layer.mask if held is None else layer.mask | held
        return out

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
        """Decide every layer's re-choice, OBF update and designation; store the plans; describe them."""
        record = AdaptationRecord(step=step, rho=self.rho_at(step))
        finite = self._gradients_finite()
        settle = step >= self.t_f
        for name, layer in self.layers():
            grid, st = self.grids[name], self._state(name, layer)
            g = layer.weight.grad
            held = self.designated[name]
            budget = budgets[name] if finite else 0
            active = g is not None and finite and (budget > 0 or bool(held.any()))
            if not active:
                self.last_score[name] = torch.full_like(self.last_score[name], float("nan"))
                record.layers.append(self._layer_record(name, grid, st, 0, 0, 0, 0, None, held))
                if settle:
                    self._plans[name] = _Plan(layer.mask.clone(), torch.zeros_like(held))
                continue
            d = self._decide(name, layer, self._scoring_gradient(name, g), budget, held, settle)
            self.obf[name] = d.state
            self.last_score[name] = d.score.float()
            old_blocks = to_blocks(layer.mask, grid, layer.layout)
            changed = ~block_equal(old_blocks, d.new_blocks)
            self._plans[name] = _Plan(from_blocks(d.new_blocks, grid, layer.weight.shape, layer.layout), d.designated)
            record.scoring_elementwise_ops += d.ops
            record.layers.append(self._layer_record(
                name, grid, d.state, int(d.scored.sum()), int(changed.sum()), int((old_blocks & ~d.new_blocks).sum()),
                int(d.events.sum()), d.score[d.scored], d.designated))
        self.adaptations += 1
        self.last_adaptation_step = step
        self._score_sum, self._score_count = {}, 0
        return record

    def _rechoose_by_magnitude(self, step: int) -> AdaptationRecord:
        """``window`` + ``magnitude``, at the start of an adaptation or settle step: the designated blocks take
        the top-N ``|W|`` of each group of the weights as the previous step left them, OBF sees the change,
        and ``progressive`` designates every block not frozen (none at the settle step; ``topk`` designates
        after the backward, from the candidates' scores on the new masks). Applied at once."""
        b = self.bcfg
        record = AdaptationRecord(step=step, rho=self.rho_at(step))
        settle = step >= self.t_f
        for name, layer in self.layers():
            grid, st = self.grids[name], self._state(name, layer)
            held = self.designated[name]
            mb = to_blocks(layer.mask, grid, layer.layout)
            wb = to_blocks(layer.weight.detach(), grid, layer.layout)
            new_mb, magnitude_ops = self._magnitude(layer, grid, wb, mb, held)
            state, events = obf_step(st, mb, new_mb, held, b.beta, b.tau, b.min_changes, b.obf_update,
                                     freeze=self._freezes(), bias_correction=b.obf_bias_correction)
            self.obf[name] = state
            changed = ~block_equal(mb, new_mb)
            n_changed = int(changed.sum())
            updated = n_changed if b.obf_update == "changed" else int(held.sum())
            designated = ~state.frozen if (b.designation == "progressive" and not settle) else torch.zeros_like(held)
            self._apply(name, layer, _Plan(from_blocks(new_mb, grid, layer.weight.shape, layer.layout), designated))
            self.last_score[name] = torch.full_like(self.last_score[name], float("nan"))
            record.scoring_elementwise_ops += (
                magnitude_ops + obf_elementwise_ops(n_changed, updated, grid.groups_per_block * grid.m))
            record.layers.append(self._layer_record(name, grid, state, int(held.sum()), n_changed,
                                                    int((mb & ~new_mb).sum()), int(events.sum()), None, designated))
        self.adaptations += 1
        self.last_adaptation_step = step
        return record

    def _designate_by_score(self, step: int, budgets: dict[str, int]) -> None:
        """``window`` + ``magnitude`` + ``topk``, after the backward of an adaptation step: the next designation,
        the top ``rho(t)`` non-frozen blocks by LMA score on the masks re-chosen at the start of the step
        (applied after the optimizer step); added to the step's record."""
        b, record = self.bcfg, self.last_adaptation
        finite = self._gradients_finite()
        for la, (name, layer) in zip(record.layers, self.layers()):
            grid, st = self.grids[name], self.obf[name]
            g, budget = layer.weight.grad, budgets[name]
            if g is None or not finite or budget == 0:
                continue
            w = layer.weight.detach()
            wb, gb, mb = (to_blocks(t, grid, layer.layout) for t in (w, self._scoring_gradient(name, g), layer.mask))
            scale = gradient_grow_scale(w, layer.mask) if b.lma == "gradient" else None
            score = self._swaps(layer, grid, wb, gb, mb, scale).score
            candidates = ~st.frozen
            designated = select_blocks(score, candidates, st.frozen, st.frequency, budget, b.selection, b.joint_lambda)
            self._plans[name] = _Plan(layer.mask.clone(), designated)
            self.last_score[name] = torch.where(candidates, score, torch.full_like(score, float("nan"))).float()
            record.scoring_elementwise_ops += self._scoring_ops(layer, grid, int(candidates.sum()), 0, 0)
            la.candidate_blocks = int(candidates.sum())
            la.designated_blocks, la.designated = int(designated.sum()), designated.detach().cpu().clone()
            la.last_score = self.last_score[name].detach().cpu().clone()
            finite_scores = score[candidates & torch.isfinite(score)]
            if finite_scores.numel():
                la.score_stats = {"mean": float(finite_scores.mean()), "max": float(finite_scores.max())}
        self._score_sum, self._score_count = {}, 0

    def _decide(self, name: str, layer: NMLayer, g: torch.Tensor, budget: int, held: torch.Tensor,
                settle: bool) -> _LayerDecision:
        """One layer's adaptation after the backward: which blocks are re-chosen, to what, OBF, and the next
        designation (``window`` + ``magnitude`` re-chooses at the start of the step instead).

        First family (``adaptation``): the designation of this step is re-chosen at once (``lma``: the best
        swap of each, ``magnitude``: top-N ``|W|``). ``window`` + ``lma``: the blocks ``held`` since the last
        adaptation make their best swap where it gains, then the next designation is made on the re-chosen
        masks (none at the settle step).
        """
        b, grid, st = self.bcfg, self.grids[name], self.obf[name]
        w = layer.weight.detach()
        wb, gb, mb = (to_blocks(t, grid, layer.layout) for t in (w, g, layer.mask))
        candidates = ~st.frozen if budget > 0 and self.scores_candidates else torch.zeros_like(st.frozen)
        scale = gradient_grow_scale(w, layer.mask) if b.lma == "gradient" else None
        nan = torch.full(st.frozen.shape, float("nan"), device=w.device)

        def swaps_on(blocks: torch.Tensor) -> BlockSwaps:
            return self._swaps(layer, grid, wb, gb, blocks, scale)

        def scoring_ops(scored: torch.Tensor, changed: int, updated: int) -> int:
            return self._scoring_ops(layer, grid, int(scored.sum()), changed, updated)

        def designate(score: torch.Tensor, state: OBFState) -> torch.Tensor:
            if b.designation == "progressive":
                return ~state.frozen if self.window else candidates & ~state.frozen
            return select_blocks(score, candidates, state.frozen, state.frequency, budget, b.selection,
                                 b.joint_lambda)

        swaps = swaps_on(mb)
        rechosen = held if self.window else designate(swaps.score, st)
        if b.regrow_rule == "lma":
            gains = rechosen & torch.isfinite(swaps.score) & (swaps.score > 0)
            new_mb = apply_swaps(mb, swaps.drop, swaps.grow, gains)
        else:
            new_mb, magnitude_ops = self._magnitude(layer, grid, wb, mb, rechosen)
        tracked = rechosen | candidates if self.window else candidates
        state, events = obf_step(st, mb, new_mb, tracked, b.beta, b.tau, b.min_changes, b.obf_update,
                                 freeze=self._freezes(), bias_correction=b.obf_bias_correction)
        changed = int((~block_equal(mb, new_mb)).sum())
        updated = changed if b.obf_update == "changed" else int(tracked.sum())
        score = torch.where(rechosen | candidates, swaps.score, nan)
        if b.regrow_rule == "lma":
            ops = scoring_ops(rechosen if self.window else candidates, changed, updated)
        else:  # the first family's designation scored the candidates; magnitude then re-chose them
            ops = (scoring_ops(candidates, 0, 0) + obf_elementwise_ops(changed, updated, grid.groups_per_block * grid.m)
                   + magnitude_ops)
        designated = torch.zeros_like(held)
        if self.window and not settle:
            if b.designation == "topk":
                fresh = swaps_on(new_mb)  # scores on the re-chosen masks
                designated = designate(fresh.score, state)
                score = torch.where(candidates, fresh.score, score)
                ops += scoring_ops(candidates, 0, 0)
            else:
                designated = designate(score, state)
        return _LayerDecision(new_mb, state, events, designated, rechosen | candidates, score, ops)

    # -- the mask's structure: swaps in groups (row) or rectangle exchanges in tiles (transposable) ------
    def _swaps(self, layer: NMLayer, grid: BlockGrid, wb: torch.Tensor, gb: torch.Tensor, mb: torch.Tensor,
               scale: Optional[torch.Tensor]) -> BlockSwaps:
        """Every block's best plan: swaps inside its groups (``row``), or rectangle exchanges inside its tiles
        (``transposable``: a swap alone would break the column counts; docs/method.md)."""
        b = self.bcfg
        if layer.transposable:
            return block_exchanges(wb, gb, mb, grid.block_rows, grid.block_groups, b.lma, b.swaps_per_block, scale)
        return block_swaps(wb, gb, mb, layer.pattern.n, b.lma, b.swaps_per_block, scale)

    def _scoring_ops(self, layer: NMLayer, grid: BlockGrid, scored: int, changed: int, updated: int) -> int:
        """Element-wise work of scoring ``scored`` blocks, selecting and OBF (the ledger's adaptation line)."""
        b, numel = self.bcfg, layer.weight.numel()
        if layer.transposable:
            tiles_per_block = grid.block_rows // grid.m * grid.block_groups
            return block_exchange_elementwise_ops(scored, tiles_per_block, grid.m, b.swaps_per_block, b.lma,
                                                  b.selection, changed, updated, layer_numel=numel)
        return adaptation_elementwise_ops(scored, grid.groups_per_block, grid.m, layer.pattern.n, b.swaps_per_block,
                                          b.lma, b.selection, changed, updated, layer_numel=numel)

    def _magnitude(self, layer: NMLayer, grid: BlockGrid, wb: torch.Tensor, mb: torch.Tensor,
                   which: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``mb`` with the blocks ``which`` (``[B]`` bool) re-chosen by magnitude: the top-N ``|W|`` of each group
        (``row``), or of each tile the transposable mask keeping the most ``|W|`` (exact); and its work."""
        n = layer.pattern.n
        if not layer.transposable:
            ops = magnitude_elementwise_ops(int(which.sum()), grid.groups_per_block, grid.m)
            return torch.where(which.view(-1, 1, 1), magnitude_blocks(wb, n), mb), ops
        picked = which.nonzero().flatten()
        if picked.numel() == 0:
            return mb, 0
        chosen, ops = transposable_blocks(wb[picked], n, grid.block_rows, grid.block_groups)
        new = mb.clone()
        new[picked] = chosen
        return new, ops

    def _freezes(self) -> bool:
        return self.bcfg.obf and self.bcfg.selection == "freeze_then_topk"

    def _gradients_finite(self) -> bool:
        """One host sync: every N:M weight gradient is finite."""
        flags = [torch.isfinite(layer.weight.grad).all() for _, layer in self.layers()
                 if layer.weight.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def _layer_record(self, name: str, grid: BlockGrid, st: OBFState, candidates: int, selected: int,
                      swaps: int, events: int, scores: Optional[torch.Tensor],
                      designated: torch.Tensor) -> LayerAdaptation:
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
            changes=st.changes.detach().cpu().clone(), designated_blocks=int(designated.sum()) if self.window else 0,
            designated=designated.detach().cpu().clone() if self.window else None)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for name, layer in self.layers():
            plan = self._plans.get(name)
            if plan is not None:
                self._apply(name, layer, plan)
            if self._budgets is not None:  # the candidates are done: only the designated blocks stay
                held = self._designated_positions[name]
                self._write_grad_mask(name, layer, held, ("clear",) if held is None else ("designated", id(held)))
        self._plans = {}
        self._budgets = None

    def _apply(self, name: str, layer: NMLayer, plan: _Plan) -> None:
        new_mask = plan.new_mask
        n, m = layer.pattern.n, layer.pattern.m
        if not is_nm(new_mask, n, m, layer.layout, exact=True):
            raise RuntimeError(f"bame: layer {name!r} of shape {tuple(layer.weight.shape)}: mask after the "
                               f"adaptation does not keep exactly {n} of every {m} (a plan is inconsistent)")
        if layer.transposable and not is_transposable_nm(new_mask, n, m, layer.layout, exact=True):
            raise RuntimeError(f"bame: layer {name!r} of shape {tuple(layer.weight.shape)}: mask after the "
                               f"adaptation is not transposable {n}:{m} (a plan is inconsistent)")
        drop, grow = layer.mask & ~new_mask, new_mask & ~layer.mask
        if self.bcfg.regrow == "zero":
            layer.weight.masked_fill_(grow, 0)
        if self.window:
            self._set_designation(name, layer, plan.designated)
        if self.train_pruned:
            # every weight that will not move keeps a zero optimizer state; trained weights keep theirs
            held = self._designated_positions[name]
            self.reset_optimizer_state(layer.weight, ~(new_mask if held is None else new_mask | held))
        else:
            self.reset_optimizer_state(layer.weight, drop | grow)
        layer.mask.copy_(new_mask)

    def _set_designation(self, name: str, layer: NMLayer, designated: torch.Tensor) -> None:
        self.designated[name] = designated
        self._designated_positions[name] = self._expand(name, layer, designated) if bool(designated.any()) else None

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per layer: frequency, EMA update counts, change counts, frozen flags, previous block states,
        last scores, designated blocks; and the step counters. All tensors (masks ride in the model's
        state dict)."""
        if self._plans:
            raise RuntimeError("bame: state_dict between after_backward and after_optimizer_step would lose "
                               "the pending swaps; checkpoint at the end of a step")
        layers = {}
        for name, st in self.obf.items():
            layers[name] = {"frequency": st.frequency, "updates": st.updates, "changes": st.changes,
                            "frozen": st.frozen, "prev_state": st.prev_state, "has_prev": st.has_prev,
                            "last_score": self.last_score[name], "designated": self.designated[name]}
            if name in self._score_sum:  # mid-way through a scoring window (score_steps > 1)
                layers[name]["score_sum"] = self._score_sum[name]
        return {"version": torch.tensor(_STATE_VERSION),
                "adaptations": torch.tensor(self.adaptations),
                "last_adaptation_step": torch.tensor(self.last_adaptation_step),
                "score_count": torch.tensor(self._score_count),
                "window": torch.tensor([self.t_i, self.t_f]),
                "layers": {k: {kk: vv.detach().clone() for kk, vv in v.items()} for k, v in layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = int(state["version"])
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"bame: method state version {version} is not one this version reads "
                             f"(1 or {_STATE_VERSION})")
        layers = dict(self.layers())
        missing, extra = set(self.obf) - set(state["layers"]), set(state["layers"]) - set(self.obf)
        if missing or extra:
            raise ValueError(f"bame: method state does not match the model's N:M layers: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, s in state["layers"].items():
            layer = layers[name]
            device = layer.weight.device
            old = self.obf[name]
            new = OBFState(s["frequency"], s["updates"], s["changes"], s["frozen"], s["prev_state"],
                           s["has_prev"]).to(device)
            for a, c in zip(old.tensors(), new.tensors()):
                if a.shape != c.shape or a.dtype != c.dtype:
                    raise ValueError(f"bame: layer {name!r}: saved state {tuple(c.shape)} {c.dtype} does not fit "
                                     f"{tuple(a.shape)} {a.dtype} (different block size or pattern?)")
            self.obf[name] = new
            self.last_score[name] = s["last_score"].to(device)
            designated = s.get("designated", torch.zeros_like(old.frozen)).to(device)
            self._set_designation(name, layer, designated)
        self._score_sum = {name: s["score_sum"].to(layers[name].weight.device)
                           for name, s in state["layers"].items() if "score_sum" in s}
        self._score_count = int(state.get("score_count", 0))
        self.adaptations = int(state["adaptations"])
        self.last_adaptation_step = int(state["last_adaptation_step"])
        self._plans, self._budgets, self._candidates = {}, None, None
        self._written = {}
