"""The method interface every sparsity method implements, and the registry.

The training loop calls, for each optimizer step ``step`` (0-based):

    method.before_step(step)            # set masks / grad masks / backward modes for this step
    loss.backward()                     # the layers' backward modes decide what is computed
    method.after_backward(step)         # gradients are in .grad: score, decide, mask the gradients
    optimizer.step()
    method.after_optimizer_step(step)   # apply mask changes, reset optimizer state where needed

and never branches on a method's name. A new method is one file and one ``@register`` line.

Weight decay of the parameters listed by :meth:`Method.self_decayed_parameters` is applied by the
method (the loop puts them in an optimizer group with ``weight_decay=0``), so that pruned weights get
no decay and no momentum: they keep their stored value. Under AdamW (decoupled decay) the method lists
none: the optimizer decays ``W *= 1 - lr * wd`` only at the positions :meth:`Method.update_positions`
gives it (``bame.optim.MaskedAdam``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Optional
from collections.abc import Callable

import torch
from torch import nn

from ..autograd import Backward
from ..forward_kernels import ForwardKernel
from ..contract import MASK_STRUCTURES, ROW_MASKS
from ..kernels import WeightGradKernel
from ..layer_patterns import LayerRule, parse_rules, rules_for_model
from ..layers import MASK_INITS, ON_INDIVISIBLE, LayerPolicy, NMLayer, SparsifyReport, nm_layers, sparsify
from ..optim import restart_state
from ..pattern import Layout, NMPattern
from ..schema import Section, choice, to_plain

__all__ = ["MethodCommon", "PatternRule", "MethodContext", "Method", "METHODS", "METHOD_SECTIONS", "register", "create_method",
           "available_methods", "AdaptationRecord", "LayerAdaptation", "GradientSegment", "extend_plan", "FlopsBudget"]


@dataclass(frozen=True)
class PatternRule(Section):
    """One rule of ``method.layer_patterns`` (bame.layer_patterns): modules whose name ``match`` matches (a
    glob, or ``re:`` and a regex on the whole name) take ``pattern`` (``"N:M"`` or ``"dense"``)."""

    match: str = ""
    pattern: str = ""


@dataclass(frozen=True)
class MethodCommon:
    """The keys of ``method`` that every method reads; ``bame.config.MethodConfig`` adds ``name``'s choices
    (the registry's names) and each method's own section."""

    name: str = "bame"
    pattern: NMPattern = NMPattern(2, 4)  # N:M, written "1:16"; parsed once, here
    layout: str = choice(*(v.value for v in Layout), default="row")
    mask_init: str = choice(*MASK_INITS, default="magnitude")
    first_conv_dense: bool = True
    classifier_dense: bool = True
    depthwise_dense: bool = True
    on_indivisible: str = choice(*ON_INDIVISIBLE, default="dense")
    srste_decay: float = 2e-4  # lambda_w of SR-STE
    asp_prune_fraction: float = 0.5  # ASP: one-shot prune at this fraction of training
    # STE / SR-STE (and phased before its switch): restart the optimizer state (Adam's two moments and step
    # count; SGD's momentum) wherever the mask flips. null: yes under adam / adamw, no under sgd (SR-STE's
    # reference code never resets; docs/method.md, "Optimizers")
    flip_reset: Optional[bool] = None
    # SPARSE weight gradient: dense kernel then mask, only the needed positions (SDDMM), or per layer the
    # faster of the two, timed once (docs/performance.md: where gather pays and where it does not)
    weight_grad_kernel: str = choice(*(k.value for k in WeightGradKernel), default="masked_dense")
    # forward / input gradient: masked dense, the sparse CSR product on the compressed W*m, or per layer shape
    # the fastest of those (and, with compile_kernels, the torch.compile'd ELL and direct kernels), timed once
    forward_kernel: str = choice(*(k.value for k in ForwardKernel), default="masked_dense")
    input_grad_kernel: str = choice(*(k.value for k in ForwardKernel), default="masked_dense")
    compile_kernels: bool = False
    # per-layer patterns, first match wins, method.pattern the fallback (docs/method.md); the config checks
    # each rule (bame.config) and the scheme file, a YAML/JSON {layer: "N:M"} or DominoSearch's file
    layer_patterns: tuple[PatternRule, ...] = ()
    layer_pattern_file: Optional[str] = None
    # 'row': N:M along K; 'transposable': N:M along K and Cout in every MxM tile (bame.transposable)
    mask_structure: str = choice(*MASK_STRUCTURES, default=ROW_MASKS)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, NMPattern):  # MethodConfig(pattern="1:16") in code
            object.__setattr__(self, "pattern", NMPattern.parse(self.pattern))

    def layer_rules(self) -> tuple[LayerRule, ...]:
        """``layer_patterns`` parsed (``ValueError`` naming the rule for a bad one)."""
        return parse_rules(to_plain(self.layer_patterns), "method.layer_patterns")

    @property
    def rule_patterns(self) -> list[NMPattern]:
        """The patterns this section may give a layer: the global one and every rule's that is not dense
        (a scheme file's are known once it is read)."""
        return [self.pattern] + [r.pattern for r in self.layer_rules() if r.pattern is not None]


@dataclass(frozen=True)
class MethodContext:
    """What a method needs to know about the run it is part of."""

    total_steps: int  # length of the schedule in optimizer steps
    steps_per_epoch: int
    weight_decay: float  # the optimizer's decay; applied by the method to self-decayed parameters
    seed: int = 0
    optimizer: str = "sgd"  # train.optimizer: sgd | adam | adamw

    @property
    def decoupled_decay(self) -> bool:
        """AdamW: the optimizer decays the weights that move (``W *= 1 - lr * wd``); the method adds no decay."""
        return self.optimizer == "adamw"


@dataclass
class LayerAdaptation:
    """What one adaptation step did to one layer (read by recorders, never by the method itself)."""

    layer: str
    num_blocks: int
    candidate_blocks: int
    frozen_blocks: int
    selected_blocks: int
    swaps: int
    oscillation_events: int
    score_stats: dict[str, float] = field(default_factory=dict)  # e.g. mean/max of R_b over candidates
    frequency: Optional[torch.Tensor] = None  # [num_blocks] oscillation frequency after this step (cpu)
    frozen: Optional[torch.Tensor] = None  # [num_blocks] bool
    last_score: Optional[torch.Tensor] = None  # [num_blocks] R_b of this step (nan where not a candidate)
    changes: Optional[torch.Tensor] = None  # [num_blocks] int, how often each block changed so far
    designated_blocks: int = 0  # blocks designated for the next window (BAME's 'window' reading)
    designated: Optional[torch.Tensor] = None  # [num_blocks] bool, those blocks (None: no window reading)


@dataclass(frozen=True)
class GradientSegment:
    """Steps ``start <= t < stop`` on which ``share[layer]`` of the pruned positions of each N:M layer
    compute their weight gradient too (a method's declared cost; ``bame flops`` counts it). An exact
    fraction: BAME's blocks tile a layer, so ``k`` of its ``B`` blocks are ``Fraction(k, B)`` of it."""

    start: int
    stop: int
    share: dict[str, Fraction]


def extend_plan(plan: list[GradientSegment], start: int, stop: int, share: dict[str, Fraction]) -> None:
    """Add steps ``start <= t < stop`` at ``share`` to a gradient plan being built in step order: they
    lengthen the last segment when they touch it at the same shares, make a new one otherwise, and are
    left out where every share is 0."""
    if plan and plan[-1].stop == start and plan[-1].share == share:
        plan[-1] = GradientSegment(plan[-1].start, stop, share)
    elif any(share.values()):
        plan.append(GradientSegment(start, stop, share))


@dataclass(frozen=True)
class FlopsBudget:
    """A method's training-FLOPs budget: the config key ``key`` in ``[low, high]``, on which the whole run's
    FLOPs do not decrease; ``note`` says how exact the count before training is, ``hint`` what to
    change when even ``high`` is not enough."""

    key: str  # dotted, e.g. method.bame.rho
    low: float
    high: float
    note: str
    hint: str = ""


@dataclass
class AdaptationRecord:
    """Everything one adaptation step decided, per layer."""

    step: int
    rho: float
    layers: list[LayerAdaptation] = field(default_factory=list)
    scoring_elementwise_ops: int = 0  # element-wise work of scoring + selection (for the FLOPs ledger)


class Method:
    """Base class: a dense-weight method that touches nothing. Subclasses override what they need."""

    name: ClassVar[str] = "base"
    # The backward mode of this method's N:M layers (bame.autograd.Backward); None: no layer is made N:M.
    backward_mode: ClassVar[Optional[Backward]] = None
    # Nested sections of MethodConfig this method reads (its own, ("bame",), set by ``register``); the
    # others do not affect it.
    config_sections: ClassVar[tuple[str, ...]] = ()
    # What ``bame flops`` should say about this method's whole-run total (how exact it is), if anything.
    flops_note: ClassVar[str] = ""

    def __init__(self, cfg: MethodCommon, ctx: MethodContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.model: Optional[nn.Module] = None
        self.report: Optional[SparsifyReport] = None
        # Filled on a step where the mask was adapted (BAME), read by recorders; None otherwise.
        self.last_adaptation: Optional[AdaptationRecord] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- set-up --------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Make ``model`` ready for this method; returns it. By default: swap its eligible layers for N:M
        layers with this method's :attr:`backward_mode` (none when that is None), masks from ``cfg.mask_init``."""
        self.model = model
        if self.backward_mode is not None:
            self.sparsify(model, self.backward_mode.value)
        return model

    def sparsify(self, model: nn.Module, backward_mode: str) -> SparsifyReport:
        """Swap the eligible layers of ``model`` for N:M layers per this method's config."""
        c = self.cfg
        policy = LayerPolicy(c.first_conv_dense, c.classifier_dense, c.depthwise_dense, c.on_indivisible)
        generator = torch.Generator().manual_seed(self.ctx.seed)
        rules = rules_for_model(model, c.layer_rules(), c.layer_pattern_file)
        self.report = sparsify(model, c.pattern, policy=policy, layout=c.layout, backward_mode=backward_mode,
                               srste_decay=c.srste_decay, mask_init=c.mask_init,
                               weight_grad_kernel=c.weight_grad_kernel, forward_kernel=c.forward_kernel,
                               input_grad_kernel=c.input_grad_kernel, compile_kernels=c.compile_kernels,
                               generator=generator, rules=rules, mask_structure=c.mask_structure,
                               layer_problem=self.layer_problem)
        return self.report

    def layer_problem(self, module: nn.Module, pattern: NMPattern) -> Optional[str]:
        """Why this method cannot make ``module`` N:M at ``pattern`` beyond the layer policy (None: it can);
        such a layer follows ``on_indivisible``, as one whose K is no multiple of M."""
        return None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the loop once the optimizer exists (methods may reset its state)."""
        self.optimizer = optimizer

    def layers(self) -> list[tuple[str, NMLayer]]:
        return list(nm_layers(self.model)) if self.model is not None else []

    def self_decayed_parameters(self) -> list[nn.Parameter]:
        """Parameters whose weight decay this method applies itself (masked)."""
        return []

    def masked_decay_weights(self) -> list[nn.Parameter]:
        """The N:M weights, whose decay a masked method adds to their gradient at the positions that move
        (L2 decay: SGD, Adam); none under decoupled decay (AdamW decays them at those positions itself)."""
        return [] if self.ctx.decoupled_decay else [layer.weight for _, layer in self.layers()]

    def update_positions(self) -> dict[torch.Tensor, torch.Tensor]:
        """For the optimizer, before each of its steps: the parameters that move only at some positions on
        this step, each with those positions (bool, its shape); a parameter left out moves everywhere.
        Elsewhere ``bame.optim.MaskedAdam`` reads and writes nothing (no decay, no moments, no step count).
        None by default: every weight trains."""
        return {}

    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method itself, outside the model (LBC's scores), that the optimizer updates: the
        optimizer's group ``method`` (``bame.experiment.param_groups``). Created by ``prepare``."""
        return []

    # -- declared costs (read by ``bame flops``; the ledger counts what really ran) --------------
    def adaptation_steps(self, run_steps: int) -> list[int]:
        """The steps before ``run_steps`` on which this method adapts the masks (none by default)."""
        return []

    def gradient_plan(self, run_steps: int) -> list[GradientSegment]:
        """Where, beyond its normal step, this method computes full weight gradients of blocks of its N:M
        layers during the first ``run_steps`` steps (nowhere by default). Needs ``prepare`` first."""
        return []

    def transition_plan(self, run_steps: int) -> list[GradientSegment]:
        """For a method with a regime switch whose masks move between the two regimes gradually (LBC's cut
        combinations): the steps ``[start, stop)`` from :attr:`regime_switch_step` on that cost the switched
        regime's step plus ``share[layer]`` of the difference between the two regimes' steps of that layer, in
        every phase (none by default)."""
        return []

    @property
    def regime_switch_step(self) -> Optional[int]:
        """The step from which the method trains in another regime (ASP's prune, ``phased``'s switch): steps
        before it cost the step of the prepared model, steps from it on the step after
        :meth:`switch_regime`. None: one regime throughout."""
        return None

    def switch_regime(self) -> None:
        """Enter, now, the regime the method trains in from :attr:`regime_switch_step` on (``bame flops``
        measures that regime's step so); only a method with a switch step has one."""
        raise NotImplementedError(f"method {self.name!r} trains in one regime (regime_switch_step is None)")

    @classmethod
    def flops_budget(cls, cfg: MethodCommon) -> Optional[FlopsBudget]:
        """The config key whose value sets this method's training FLOPs (what ``bame flops --target-ratio``
        solves for), or None when it has none. Raises ``ConfigError`` for a config it cannot be solved in."""
        return None

    # -- per step hooks ------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self.last_adaptation = None

    def after_backward(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    def mask_work_ops(self) -> int:
        """Element-wise work of this step's mask decisions (scoring, selection, sorts, searches), read after
        ``after_backward`` and booked on the ledger's adaptation line: by default the adaptation record's."""
        return self.last_adaptation.scoring_elementwise_ops if self.last_adaptation is not None else 0

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the model's buffers (masks live in the model's state dict)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- shared helpers for masked methods -----------------------------------------------------
    @torch.no_grad()
    def mask_gradients_and_decay(self) -> None:
        """For each N:M layer: grad <- (grad + wd * W) * mask (AdamW: grad <- grad * mask; its optimizer
        decays the kept weights). Pruned weights then never move."""
        wd = 0.0 if self.ctx.decoupled_decay else self.ctx.weight_decay
        for _, layer in self.layers():
            w = layer.weight
            if w.grad is None:
                continue
            if wd:
                w.grad.add_(w, alpha=wd)
            w.grad.mul_(layer.mask)

    def reset_optimizer_state(self, param: nn.Parameter, where: torch.Tensor) -> None:
        """Restart the optimizer's state of ``param`` at ``where``: SGD's momentum, or Adam's two moments and
        its step count (``bame.optim.restart_state``)."""
        restart_state(self.optimizer, param, where)


METHODS: dict[str, type[Method]] = {}
# method name -> the frozen dataclass of its own config section, ``method.<name>`` (bame.config adds one
# field to MethodConfig per entry)
METHOD_SECTIONS: dict[str, type] = {}


def register(name: str, config: Optional[type] = None) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to :data:`METHODS` under ``name``, with ``config`` (a frozen dataclass,
    ideally a :class:`bame.schema.Section`) as its own config section ``method.<name>`` when it has one.

    Register before ``bame.config`` is first imported: every module of this package is imported (and so
    registered) when the package is.
    """
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.config_sections = (name,) if config is not None else ()
        METHODS[name] = cls
        if config is not None:
            METHOD_SECTIONS[name] = config
        return cls
    return deco


def available_methods() -> list[str]:
    return sorted(METHODS)


def create_method(cfg: MethodCommon, ctx: MethodContext) -> Method:
    """The method named by ``cfg.name``."""
    if cfg.name not in METHODS:
        raise ValueError(f"unknown method {cfg.name!r}: available are {available_methods()}")
    return METHODS[cfg.name](cfg, ctx)
