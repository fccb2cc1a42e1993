"""``bame flops``: the exact training cost of a config, before training, and the budget for a target ratio.

The report stands on the ledger (:mod:`bame.flops`) and on the experiment the training loop builds
(:func:`bame.experiment.build`): it measures one normal and one adaptation step of the configured model and
method with a :class:`bame.flops.FlopsLedger` (a real forward + backward on a random batch) and adds up the
whole run from the method's declared costs (:meth:`bame.methods.Method.gradient_plan`,
:attr:`~bame.methods.Method.regime_switch_step`, :meth:`~bame.methods.Method.switch_regime`). Counts are
:data:`bame.contract.FLOPS_CONVENTION`.

``--target-ratio R`` solves for the budget the method declares (:meth:`bame.methods.Method.flops_budget`:
BAME's ``rho``, or its ``t_f_fraction`` under ``progressive``; ``phased``'s ``switch_fraction``) that puts
SR-STE's training FLOPs at ``R`` times the method's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from . import models
from .attention_flops import MATMUL_SUFFIX, attention_modules
from .config import Config, ConfigError, MethodConfig, with_value
from .contract import FLOPS_CONVENTION, FORWARD, INPUT_GRAD, LAYER_PHASES, ROW_MASKS, TRANSPOSABLE_TAG, WEIGHT_GRAD
from .data.specs import DataShape, data_shape
from .experiment import build, method_context
from .flops import StepCosts, model_step_costs
from .layers import NMLayer
from .methods import METHODS, FlopsBudget, Method, create_method
from .runs import config_pattern_label
from .schedule import Schedule

__all__ = ["DataShape", "data_shape", "flops_report", "format_report", "TargetBudget", "solve_target_ratio",
           "format_target", "add_flops_parser", "cli_flops"]


@dataclass
class _Measured:
    """One config's measured steps, at batch ``b``, and what scales them to the config's batch."""

    cfg: Config
    sched: Schedule
    batch: int
    b: int
    model: nn.Module  # the method's prepared model (in its last regime)
    method: Method
    dense: StepCosts
    sparse: StepCosts  # the step of the method's (last) regime, and its adaptation step
    before_switch: Optional[StepCosts]  # the prepared regime's step, for a method that switches regime
    extra: dict[str, tuple[int, int]]  # per N:M layer: the full weight gradient of all its pruned positions
    gap: dict[str, tuple[int, int]]  # per N:M layer, for a method that switches regime: the prepared regime's
    # step less the switched regime's, every phase (what a transition plan's shares are of)

    def scale(self, macs: int) -> int:  # MACs are linear in batch; every count is a multiple of b
        return macs // self.b * self.batch


def _measure(cfg, measure_batch: int) -> _Measured:
    """The dense model's step, and the method's normal and adaptation steps (and its prepared regime's step,
    for a method that switches regime) on the experiment of ``cfg`` (``bame.experiment.build``)."""
    shape = data_shape(cfg.data)
    batch = cfg.train.batch_size
    b = min(batch, measure_batch)
    input_shape = (b, shape.in_channels, shape.image_size, shape.image_size)
    torch.manual_seed(cfg.train.seed)
    try:
        dense_model = models.create(cfg.model.name, num_classes=shape.num_classes, in_channels=shape.in_channels,
                                    image_size=shape.image_size)
    except ValueError as err:  # an unknown name, a size the model cannot take, timm missing
        raise ConfigError([f"model.name: {err}"]) from None
    dense = model_step_costs(dense_model, input_shape)
    torch.manual_seed(cfg.train.seed)  # the same initial weights as the dense model
    exp = build(cfg, shape=shape)
    exp.ledger.detach()  # each step is measured by a ledger of its own
    model, method = exp.model, exp.method
    sparse = model_step_costs(model, input_shape)
    before = None
    if method.regime_switch_step is not None:
        before = sparse
        method.switch_regime()
        sparse = model_step_costs(model, input_shape)
    m = _Measured(cfg, exp.schedule, batch, b, model, method, dense, sparse, before, {}, {})
    m.extra = {n: (m.scale(sparse.adapt.by_layer[(n, WEIGHT_GRAD)][0] - sparse.step.by_layer[(n, WEIGHT_GRAD)][0]),
                   m.scale(sparse.adapt.by_layer[(n, WEIGHT_GRAD)][1] - sparse.step.by_layer[(n, WEIGHT_GRAD)][1]))
               for n, mod in model.named_modules()
               if isinstance(mod, NMLayer) and (n, WEIGHT_GRAD) in sparse.step.by_layer}
    if before is not None:
        def layer_step(cost, n: str, i: int) -> int:  # i: 0 ideal, 1 executed; every phase
            return sum(cost.by_layer.get((n, ph), (0, 0))[i] for ph in LAYER_PHASES)

        m.gap = {n: (m.scale(layer_step(before.step, n, 0) - layer_step(sparse.step, n, 0)),
                     m.scale(layer_step(before.step, n, 1) - layer_step(sparse.step, n, 1)))
                 for n, mod in model.named_modules() if isinstance(mod, NMLayer)}
    return m


def _run_totals(m: _Measured, method) -> tuple[int, int]:
    """The whole run's (ideal, executed) MACs of ``method`` (prepared on ``m``'s model shape): every step at
    its regime's normal step, plus the method's gradient plan (each segment's share of the layers' extra) and
    its transition plan (each segment's share of the layers' gap between the two regimes)."""
    run = m.sched.run_steps
    step_i, step_e = m.scale(m.sparse.step.ideal_macs), m.scale(m.sparse.step.executed_macs)
    total_i, total_e = run * step_i, run * step_e
    switch = method.regime_switch_step
    if m.before_switch is not None and switch is not None:
        early = min(switch, run)
        total_i += early * (m.scale(m.before_switch.step.ideal_macs) - step_i)
        total_e += early * (m.scale(m.before_switch.step.executed_macs) - step_e)
    for plan, per_layer in ((method.gradient_plan(run), m.extra), (method.transition_plan(run), m.gap)):
        for seg in plan:
            for n, share in seg.share.items():
                if n in per_layer and share:
                    total_i += (seg.stop - seg.start) * (per_layer[n][0] * share.numerator // share.denominator)
                    total_e += (seg.stop - seg.start) * (per_layer[n][1] * share.numerator // share.denominator)
    return total_i, total_e


def flops_report(cfg, measure_batch: int = 2) -> dict:
    """The ``bame flops`` report of a config as a dict (what ``--json`` prints).

    Measured (never estimated): one step of the dense model with dense backward (``dense_step_macs``),
    one normal step of the method's model (``step_macs``) and one adaptation step with every block of
    every N:M layer a candidate (``adapt_step_macs``), each a real forward+backward at batch
    ``min(batch, measure_batch)`` scaled linearly to the config's batch. The whole run adds the method's
    gradient plan (no block frozen, every budget filled: exact for BAME's candidates, an upper bound for
    blocks that learn). A method that switches regime (ASP's prune, ``phased``'s switch) costs the
    prepared step before its switch step and the step measured after ``method.before_step(switch)`` from
    it on.
    """
    m = _measure(cfg, measure_batch)
    method, sched, scale = m.method, m.sched, m.scale
    run = sched.run_steps
    plan = method.gradient_plan(run)
    sparse = m.sparse if plan else StepCosts(m.sparse.batch, m.sparse.step, m.sparse.step)
    nm_names = {n for n, mod in m.model.named_modules() if isinstance(mod, NMLayer)}
    attention = {name for _, name, _ in attention_modules(m.model)}
    layers = []
    for name, mod in m.model.named_modules():
        if name in attention:  # QK^T and AV: shape [heads, head_dim], dense in every method
            entry = dict(layer=name + MATMUL_SUFFIX, kind="attention", shape=[mod.num_heads, mod.head_dim],
                         sparse=False, pattern=None, backward="dense")
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            entry = dict(layer=name, kind="conv" if isinstance(mod, nn.Conv2d) else "linear",
                         shape=list(mod.weight.shape), sparse=name in nm_names,
                         pattern=str(mod.pattern) if name in nm_names else None,
                         transposable=name in nm_names and mod.transposable,
                         backward=mod.backward_mode.value if name in nm_names else "dense")
        else:
            continue
        layer = entry["layer"]
        for key, cost in (("dense", m.dense.step), ("step", sparse.step), ("adapt", sparse.adapt)):
            entry[key] = {ph: dict(ideal=scale(cost.by_layer[(layer, ph)][0]),
                                   executed=scale(cost.by_layer[(layer, ph)][1]),
                                   nm_on_reduction=cost.by_layer[(layer, ph)][2])
                          for ph in LAYER_PHASES if (layer, ph) in cost.by_layer}
        layers.append(entry)
    step_i, step_e = scale(sparse.step.ideal_macs), scale(sparse.step.executed_macs)
    dense_i = scale(m.dense.step.ideal_macs)
    total_i, total_e = _run_totals(m, method)
    batch = m.batch
    shape = data_shape(cfg.data)
    notes = [f"measured with one real forward+backward at batch {m.b} and scaled linearly to batch {batch} "
             "(MACs are linear in batch)",
             "conv and linear layers, and attention's QK^T and AV matmuls (dense; the gradients of both "
             "operands booked as input_grad); no batch or layer norm, activations, softmax, pooling, optimizer; "
             "the adaptation line (element-wise scoring and selection) is booked by the ledger during "
             "training, not here",
             ("adaptation step: every block of every N:M layer a candidate (the first adaptation step, nothing "
              "frozen); whole run: the method's gradient plan with no block frozen and every budget filled "
              "(exact for candidates, an upper bound for designated blocks that learn), a layer whose block "
              "budget rounds to 0 computes no candidate gradient") if plan else
             f"{cfg.method.name} computes no weight gradient beyond its normal step: adapt_step_macs = step_macs"]
    rep = dict(
        convention=FLOPS_CONVENTION, config=cfg.name, model=cfg.model.name, data=cfg.data.name,
        input_shape=[batch, shape.in_channels, shape.image_size, shape.image_size], measured_batch=m.b,
        method=cfg.method.name, pattern=config_pattern_label(cfg), mask_structure=cfg.method.mask_structure,
        dense_step_macs=dense_i, step_macs=step_i, step_executed_macs=step_e,
        adapt_step_macs=scale(sparse.adapt.ideal_macs), adapt_step_executed_macs=scale(sparse.adapt.executed_macs),
        step_by_phase={ph: scale(sparse.step.by_phase[ph][0]) for ph in LAYER_PHASES},
        adapt_step_by_phase={ph: scale(sparse.adapt.by_phase[ph][0]) for ph in LAYER_PHASES},
        dense_step_by_phase={ph: scale(m.dense.step.by_phase[ph][0]) for ph in LAYER_PHASES},
        steps_per_epoch=sched.steps_per_epoch, schedule_steps=sched.schedule_steps, run_steps=run,
        adaptation_steps=len(method.adaptation_steps(run)),
        dense_run_total_macs=run * dense_i, layers=layers, notes=notes)
    switch = method.regime_switch_step
    if m.before_switch is not None and switch is not None and switch < run:
        pre_i = scale(m.before_switch.step.ideal_macs)
        pre_e = scale(m.before_switch.step.executed_macs)
        rep.update(prune_step=switch, before_prune_step_macs=pre_i, before_prune_step_executed_macs=pre_e)
        notes.append(f"{cfg.method.name}: steps before {switch} cost before_prune_step_macs "
                     f"({_fmt(pre_i)}), the rest step_macs")
        if method.transition_plan(run):
            notes.append(f"{cfg.method.name}: from step {switch} on, its transition plan adds to step_macs a share "
                         f"of the gap to before_prune_step_macs per layer while its masks move")
    if method.flops_note:
        notes.append(f"{cfg.method.name}: {method.flops_note}")
    rep.update(run_total_macs=total_i, run_total_executed_macs=total_e)
    return rep


# --------------------------------------------------------------------------------------------------
# --target-ratio: the budget that puts SR-STE / method training FLOPs at R


@dataclass(frozen=True)
class TargetBudget:
    """The solved budget: ``key=value`` puts ``srste_macs / run_macs`` at ``ratio``, as near ``target`` as the
    budget's steps allow (``value_other``, on the other side of the target, gives ``ratio_other``)."""

    key: str
    value: float
    target: float
    ratio: float
    run_macs: int
    srste_macs: int
    value_other: float
    ratio_other: float
    note: str


def _budget(cfg) -> FlopsBudget:
    """The method's declared training-FLOPs budget; a one-line error naming the methods that have one."""
    budget = METHODS[cfg.method.name].flops_budget(cfg.method)
    if budget is None:
        have = [f"method.name={name} ({b.key})" for name, cls in sorted(METHODS.items())
                if (b := cls.flops_budget(MethodConfig(name=name))) is not None]
        raise ConfigError([f"bame flops --target-ratio: method {cfg.method.name!r} has no training-FLOPs budget to "
                           f"solve for; use a method that has one: {' or '.join(have)}"])
    return budget


def solve_target_ratio(cfg, target: float, measure_batch: int = 2, iterations: int = 40,
                       tolerance: float = 1e-7) -> TargetBudget:
    """The budget at which SR-STE's training FLOPs (same config, ``method.name=srste``) are ``target``
    times the method's, by bisection on the (non-decreasing) run total; ``ValueError`` when out of reach."""
    if not target > 0:
        raise ConfigError([f"bame flops --target-ratio must be > 0, got {target}"])
    budget = _budget(cfg)
    key, low, high = budget.key, budget.low, budget.high
    reference = _measure(replace(cfg, method=replace(cfg.method, name="srste")), measure_batch)
    srste = _run_totals(reference, reference.method)[0]
    base = _measure(cfg, measure_batch)
    goal = srste / target  # the run total wanted

    scratch = copy.deepcopy(base.model)  # already N:M: a trial's prepare only builds the method's own state

    def total(value: float) -> int:
        method = create_method(with_value(cfg, key, value).method, method_context(cfg.train, base.sched))
        method.prepare(scratch)
        return _run_totals(base, method)[0]

    lo_total, hi_total = total(low), total(high)
    if lo_total > goal:
        raise ConfigError([f"bame flops --target-ratio {target}: out of reach, even {key}={low} gives "
                         f"SR-STE / {cfg.method.name} = {srste / lo_total:.3f}; ask for at most that"])
    if hi_total < goal:
        raise ConfigError([f"bame flops --target-ratio {target}: out of reach, even {key}={high} gives "
                         f"SR-STE / {cfg.method.name} = {srste / hi_total:.3f}; ask for at least that{budget.hint}"])
    lo, hi = low, high  # total(lo) < goal <= total(hi)
    for _ in range(iterations):
        if hi - lo < tolerance:
            break
        mid = (lo + hi) / 2
        if total(mid) < goal:
            lo = mid
        else:
            hi = mid
    t_lo, t_hi = total(lo), total(hi)
    # the side whose ratio is nearest the target, written with as few digits as give the same total
    (pick, t_pick), (other, t_other) = sorted([(hi, t_hi), (lo, t_lo)],
                                              key=lambda vt: abs(srste / max(vt[1], 1) - target))
    for digits in range(1, 17):
        short = float(f"{pick:.{digits}g}")
        if low <= short <= high and total(short) == t_pick:
            pick = short
            break
    return TargetBudget(key, pick, target, srste / t_pick, t_pick, srste, other, srste / max(t_other, 1),
                        budget.note)


def format_target(t: TargetBudget, method: str) -> str:
    return (f"{t.key}={t.value:g}: SR-STE / {method} training FLOPs = {t.ratio:.3f} (target {t.target:g}); "
            f"{_fmt(t.run_macs)} MACs vs SR-STE {_fmt(t.srste_macs)}; on the other side of the target "
            f"{t.key}={t.value_other:.6g} gives {t.ratio_other:.3f}. Note: {t.note}.")


# --------------------------------------------------------------------------------------------------
# the table and the command


def _fmt(macs: float) -> str:
    """``1234567`` -> ``1.235M`` (SI prefixes)."""
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(macs) >= div:
            return f"{macs / div:.3f}{unit}"
    return f"{macs:.0f}"


def format_report(rep: dict) -> str:
    """The human-readable table of :func:`flops_report`."""
    lines = [f"bame flops: {rep['model']} on {rep['data']} (input {'x'.join(map(str, rep['input_shape']))}), "
             f"method {rep['method']} {rep['pattern']}"
             + (f", {rep['mask_structure']} masks" if rep.get("mask_structure", ROW_MASKS) != ROW_MASKS else ""),
             f"counts: {rep['convention']}"]
    lines += [f"note: {n}" for n in rep["notes"]]
    lines.append("")
    head = (f"{'layer':<34} {'shape':<16} {'pattern':<9} {'forward':>10} {'input_grad':>10} {'weight_grad':>11} "
            f"{'w_grad@adapt':>12} {'executed':>10}  nm_on_reduction(f/i/w)")
    lines += [f"per layer, one step (ideal MACs unless 'executed'; pattern: the layer's own, {TRANSPOSABLE_TAG} a "
              f"transposable mask):", head, "-" * len(head)]
    for e in rep["layers"]:
        st, ad = e["step"], e["adapt"]
        get = lambda d, ph, k="ideal": d.get(ph, {}).get(k, 0)  # noqa: E731
        executed = sum(get(st, ph, "executed") for ph in LAYER_PHASES)
        flags = "/".join("y" if st.get(ph, {}).get("nm_on_reduction") else "-" for ph in LAYER_PHASES)
        kind = (e["pattern"] + (TRANSPOSABLE_TAG if e.get("transposable") else "")) if e["sparse"] else "dense"
        lines.append(f"{e['layer'][:34]:<34} {'x'.join(map(str, e['shape'])):<16} {kind:<9} "
                     f"{_fmt(get(st, FORWARD)):>10} {_fmt(get(st, INPUT_GRAD)):>10} {_fmt(get(st, WEIGHT_GRAD)):>11} "
                     f"{_fmt(get(ad, WEIGHT_GRAD)):>12} {_fmt(executed):>10}  {flags}")
    d = rep["dense_step_macs"]
    ratio = lambda x: f"{x / d:.3f} of dense" if d else ""  # noqa: E731
    lines += ["",
              f"one step, all phases (batch {rep['input_shape'][0]}):",
              f"  dense model, dense backward:   {_fmt(d):>10} MACs",
              f"  normal step   ideal {_fmt(rep['step_macs']):>10}  executed {_fmt(rep['step_executed_macs']):>10}"
              f"  ({ratio(rep['step_macs'])})",
              f"  adaptation    ideal {_fmt(rep['adapt_step_macs']):>10}  executed "
              f"{_fmt(rep['adapt_step_executed_macs']):>10}  ({ratio(rep['adapt_step_macs'])})",
              *([f"  before step {rep['prune_step']}: ideal {_fmt(rep['before_prune_step_macs']):>10}  executed "
                 f"{_fmt(rep['before_prune_step_executed_macs']):>10}"] if "prune_step" in rep else []),
              "",
              f"whole run: {rep['run_steps']} steps ({rep['steps_per_epoch']} per epoch, schedule "
              f"{rep['schedule_steps']}), {rep['adaptation_steps']} adaptation steps:",
              f"  ideal {_fmt(rep['run_total_macs'])} MACs = {_fmt(2 * rep['run_total_macs'])} FLOPs; executed "
              f"{_fmt(rep['run_total_executed_macs'])} MACs; dense run {_fmt(rep['dense_run_total_macs'])} MACs"
              + (f" ({rep['dense_run_total_macs'] / rep['run_total_macs']:.2f}x the ideal sparse run)"
                 if rep['run_total_macs'] else "")]
    return "\n".join(lines)


def add_flops_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bame flops --config FILE [--set key=value ...] [--json] [--target-ratio R]`` to ``subparsers``."""
    p = subparsers.add_parser(
        "flops", help="exact conv/linear training MACs of one step and of the whole run",
        description="Measure one normal and one adaptation training step of the configured model and "
                    "method with the FLOPs ledger (a real forward+backward on a random batch), and the "
                    f"whole-run total under the config's schedule. Counts are {FLOPS_CONVENTION}.")
    p.add_argument("--config", default=None, help="YAML config or named experiment (defaults when omitted)")
    p.add_argument("--set", dest="set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. method.pattern=1:16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--target-ratio", type=float, default=None, metavar="R",
                   help="solve for the budget (bame: rho, or t_f_fraction when designation=progressive; phased: "
                        "switch_fraction) that makes SR-STE's training FLOPs R times the method's, and print it")
    p.set_defaults(func=cli_flops)
    return p


def cli_flops(args: argparse.Namespace) -> int:
    """``bame flops``: print the report of ``args.config`` (+ ``args.set``); returns the exit code."""
    from .config import load_config

    cfg = load_config(args.config, list(args.set))
    if args.target_ratio is not None:
        t = solve_target_ratio(cfg, args.target_ratio)
        if args.json:
            json.dump(t.__dict__, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(format_target(t, cfg.method.name))
        return 0
    rep = flops_report(cfg)
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(rep))
    return 0
