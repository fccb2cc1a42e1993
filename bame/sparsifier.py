"""``bame.attach``: a sparsity method inside a training loop of your own, in the step order of docs/contracts.md.

::

    model, optimizer = make_model(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sp = bame.attach(model, optimizer, method="bame", pattern="1:16", total_steps=len(loader) * epochs, rho=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader) * epochs)
    step = 0
    for epoch in range(epochs):
        for x, y in loader:
            sp.before_step(step)                     # masks, gradient masks, backward modes for this step
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            sp.after_backward(step)                  # scoring, gradient masking, masked decay
            optimizer.step(); scheduler.step()
            sp.after_optimizer_step(step)            # mask swaps, momentum resets, FLOPs, recorders
            step += 1
    print(sp.ledger.total_ideal_macs, sp.records.frame("adaptation"))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "bame": sp.state_dict()}, path)

``step`` is the global optimizer step (0, 1, 2, ... across epochs). What attach does to your objects:

- **the model**: its eligible conv/linear layers are swapped in place for N:M layers (``method.prepare``);
  the swapped layers' parameters are new tensors (same values), replaced in ``optimizer``'s groups (and its
  state, if any), so an optimizer built before ``attach`` keeps training them.
- **the optimizer's weight decay**: the method decays its own parameters (``self_decayed_parameters``: the
  N:M weights of ``static``, ``bame``, ``asp``, ``phased``) masked, so that pruned weights get no decay and
  no momentum. Every group holding such a parameter gets ``weight_decay=0``; the method applies that
  group's decay to its parameters (``grad += wd * W`` at the kept positions) and ``after_backward`` applies
  it to the group's other parameters (``grad += wd * p``, the term SGD, Adam and RMSprop add themselves), so
  the update is unchanged bit for bit. No group is added, so an LR scheduler built before or after keeps
  working. Groups without such a parameter are untouched. Refused, with the fix named: decoupled decay
  (AdamW) on such a group, ``maximize``, and different decays on the method's parameters.
- **FLOPs** (``sp.ledger``, a :class:`bame.flops.FlopsLedger`) are charged only between ``before_step`` and
  ``after_optimizer_step``: evaluation between steps costs nothing.
- **records** (``sp.records``): the recorders' tables (``masks``, ``adaptation``) and block snapshots in
  memory (a ``sink=`` of your own gets them instead: ``append(table, row)``, ``save_arrays(name, arrays)``).
- **checkpoints**: ``sp.state_dict()`` (plain data: loads with ``torch.load(weights_only=True)``) rides in
  your checkpoint next to the model's (which holds the masks) and the optimizer's; to resume, build the
  model and optimizer, ``attach`` with the same arguments, then load the model, the optimizer and
  ``sp.load_state_dict(...)``.

Calls out of order (a missing ``after_backward``, a step index that restarts each epoch, ``optimizer.step()``
before ``after_backward``) raise a ``RuntimeError`` that says which call is missing. Mixed precision: call
``scaler.unscale_(optimizer)`` before ``after_backward`` (the method must see true gradients).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Optional

import pandas as pd
import torch
from torch import nn

from .config import ConfigError, MethodConfig, from_dict, to_dict
from .contract import TABLE_COLUMNS
from .flops import FlopsLedger, StepCost
from .instrument import InstrumentConfig, Recorders
from .methods import METHOD_SECTIONS, Method, MethodCommon, MethodContext, create_method
from .pattern import NMPattern
from .resume import config_changes

__all__ = ["attach", "prepare", "Sparsifier", "Records", "method_config"]

STATE_FORMAT = 1
_COMMON_KEYS = frozenset(f.name for f in dataclasses.fields(MethodCommon))


def method_config(method: str, pattern: str | NMPattern, options: dict[str, Any]) -> MethodConfig:
    """The ``method`` section for ``method`` at ``pattern``: ``options`` keys of every method (``layout``,
    ``mask_init``, ...) at its top, the others in the method's own section (``rho`` -> ``method.bame.rho``).
    Validated as a config file is: :class:`ConfigError` names each bad key."""
    section: dict[str, Any] = {"name": method, "pattern": str(pattern)}
    own: dict[str, Any] = {}
    for key, value in options.items():
        (section if key in _COMMON_KEYS or method not in METHOD_SECTIONS else own)[key] = value
    if own:
        section[method] = own
    return from_dict({"method": section}, "bame.attach").method


class Records:
    """The recorders' output kept in memory: rows per table and block snapshots (``sp.records``)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.arrays: dict[str, dict[str, Any]] = {}  # e.g. "step_00000100" -> {"<layer>.frequency": array}

    def append(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(dict(row))

    def save_arrays(self, name: str, arrays: dict[str, Any]) -> None:
        self.arrays[name] = dict(arrays)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """The rows of ``table`` (``masks``, ``adaptation``) so far, oldest first."""
        return list(self.tables.get(table, []))

    def frame(self, table: str) -> pd.DataFrame:
        """``table`` as a DataFrame (the contract's columns, also when it has no row yet)."""
        return pd.DataFrame(self.rows(table), columns=list(TABLE_COLUMNS.get(table, ())) or None)


@dataclasses.dataclass
class _Decay:
    """The weight decay taken over from the optimizer's groups that hold the method's parameters."""

    weight_decay: float  # the decay of those groups (one value), applied by the method to its own parameters
    others: list[nn.Parameter]  # the other parameters of those groups, decayed in after_backward


def _swap_parameters(optimizer: torch.optim.Optimizer, swapped: dict[int, nn.Parameter]) -> None:
    """Replace each parameter ``id -> new`` in the optimizer's groups, moving its state along."""
    for group in optimizer.param_groups:
        group["params"] = [swapped.get(id(p), p) for p in group["params"]]
    for old in [p for p in optimizer.state if id(p) in swapped]:
        optimizer.state[swapped[id(old)]] = optimizer.state.pop(old)


def _take_over_decay(optimizer: torch.optim.Optimizer, own: list[nn.Parameter]) -> _Decay:
    """Set ``weight_decay=0`` in every group holding one of ``own`` (the method's self-decayed parameters)
    and return what to apply instead; refuse what cannot be moved into the gradient."""
    mine = {id(p) for p in own}
    groups = [g for g in optimizer.param_groups if any(id(p) in mine for p in g["params"])]
    decays = sorted({float(g.get("weight_decay", 0.0)) for g in groups})
    if len(decays) > 1:
        raise ValueError(f"bame.attach: the N:M weights sit in optimizer groups with different weight_decay "
                         f"{decays}; the method decays them all with one value: give them one weight_decay")
    wd = decays[0] if decays else 0.0
    for g in groups:
        if g.get("maximize"):
            raise ValueError("bame.attach: the optimizer maximizes (maximize=True); the method's masked "
                             "gradients assume a loss to minimise: use maximize=False and negate the loss")
        if wd and (g.get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW)):
            raise ValueError(f"bame.attach: {type(optimizer).__name__} decays weights outside the gradient "
                             f"(W *= 1 - lr * wd), which would shrink pruned weights; give the N:M layers' "
                             f"weights weight_decay=0 in their group, or use SGD or Adam (L2 in the gradient, "
                             f"which the method masks)")
    others = [p for g in groups for p in g["params"] if id(p) not in mine]
    for g in groups:
        g["weight_decay"] = 0.0
    return _Decay(wd, others)


IDLE, OPEN, BACKWARD_DONE = "idle", "open", "backward done"


class Sparsifier:
    """A method attached to a model and optimizer of your own (made by :func:`attach`).

    ``method`` (:class:`bame.methods.Method`), ``ledger`` (:class:`bame.flops.FlopsLedger`), ``records``
    (:class:`Records`, or the sink given), ``recorders``; after each step ``last_cost`` (its
    :class:`bame.flops.StepCost`), ``scalars`` (``sad_fraction``, ``cum_mask_flips``) and ``step`` (steps done).
    """

    def __init__(self, model: nn.Module, method: Method, cfg: MethodConfig, total_steps: int,
                 instrument: InstrumentConfig, sink: Any) -> None:
        self.model, self.method, self.cfg, self.total_steps = model, method, cfg, total_steps
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.decay = _Decay(0.0, [])
        self.ledger = FlopsLedger(model, enabled=instrument.flops)
        self.records = sink
        self.recorders = Recorders(instrument, model, method, sink)
        self.step = 0  # optimizer steps done
        self.phase = IDLE
        self.last_cost = StepCost(0, 0, {})
        self.scalars: dict[str, float] = {}
        self._between_steps = contextlib.ExitStack()  # holds ledger.paused() outside the steps
        self._between_steps.enter_context(self.ledger.paused())
        self._hook: Any = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Train with ``optimizer`` (which holds the N:M model's parameters): take over the weight decay of the
        groups that hold the method's own parameters (module docstring) and check its steps' order."""
        self.decay = _take_over_decay(optimizer, self.method.self_decayed_parameters())
        self.method.ctx = dataclasses.replace(self.method.ctx, weight_decay=self.decay.weight_decay)
        self.method.attach_optimizer(optimizer)
        if self._hook is not None:
            self._hook.remove()
        self.optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(self._check_optimizer_step)

    # -- the step (docs/contracts.md) ----------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Before the forward pass of optimizer step ``step`` (0-based, global: it does not restart each epoch)."""
        if self.optimizer is None:
            raise RuntimeError("bame: before_step() before the optimizer is bound: use bame.attach(model, optimizer, ...)")
        if self.phase != IDLE:
            raise RuntimeError(f"bame.attach: before_step({step}) while step {self.step} is open: call "
                               f"sp.after_optimizer_step({self.step}) after optimizer.step()")
        if step != self.step:
            raise RuntimeError(f"bame.attach: before_step({step}), but {self.step} steps are done: pass the global "
                               f"optimizer step ({self.step} now; it does not restart each epoch)")
        self._between_steps.close()  # the ledger counts from here
        self.method.before_step(step)
        self.ledger.begin_step()
        self.phase = OPEN

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """After ``loss.backward()`` (and ``scaler.unscale_``), before ``optimizer.step()``."""
        self._expect(step, OPEN, "after_backward", f"call sp.before_step({step}) before the forward pass")
        self.method.after_backward(step)
        wd = self.decay.weight_decay
        if wd:
            for p in self.decay.others:
                if p.grad is not None:
                    p.grad.add_(p, alpha=wd)
        adaptation = self.method.last_adaptation
        if adaptation is not None:
            self.ledger.charge_adaptation(adaptation.scoring_elementwise_ops)
        self.phase = BACKWARD_DONE

    def after_optimizer_step(self, step: int) -> None:
        """After ``optimizer.step()`` (and the LR scheduler's): mask changes, FLOPs of the step, recorders."""
        self._expect(step, BACKWARD_DONE, "after_optimizer_step",
                     f"call sp.after_backward({step}) between loss.backward() and optimizer.step()")
        self.method.after_optimizer_step(step)
        self.last_cost = self.ledger.end_step()
        self._between_steps.enter_context(self.ledger.paused())
        self.scalars = self.recorders.on_step_end(step)
        self.step, self.phase = step + 1, IDLE

    def _expect(self, step: int, phase: str, call: str, fix: str) -> None:
        if self.phase != phase or step != self.step:
            raise RuntimeError(f"bame.attach: {call}({step}) out of order (step {self.step}, {self.phase}): {fix}")

    def _check_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.phase != BACKWARD_DONE:
            raise RuntimeError(f"bame.attach: optimizer.step() ran in step {self.step} before "
                               f"sp.after_backward({self.step}), so the gradients were not masked and pruned "
                               f"weights may have moved: call sp.after_backward(step) before optimizer.step()")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing run inside is charged to the ledger (already so between steps; for work inside a step)."""
        with self.ledger.paused():
            yield

    def detach(self) -> None:
        """Stop counting and checking: the ledger's hooks and the optimizer hook are removed (totals stay)."""
        if self._hook is not None:
            self._hook.remove()
        self._between_steps.close()
        self.ledger.detach()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data for your checkpoint: the method's state, the ledger's totals, the recorders' counters and
        the step (the masks are in the model's state dict)."""
        if self.phase != IDLE:
            raise RuntimeError(f"bame.attach: state_dict() inside step {self.step}: save after "
                               f"sp.after_optimizer_step(step)")
        return {"format": STATE_FORMAT, "method_config": to_dict(self.cfg), "total_steps": self.total_steps,
                "weight_decay": self.decay.weight_decay, "step": self.step, "method": self.method.state_dict(),
                "ledger": self.ledger.state_dict(), "recorders": self.recorders.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (after the model's state dict); refused when it was attached with
        other arguments."""
        changed = config_changes(from_dict({"method": state["method_config"]}, "the saved state"),
                                 from_dict({"method": to_dict(self.cfg)}, "bame.attach"), allowed=())
        changed += [f"{key}: {state[key]!r} -> {now!r}" for key, now in
                    (("total_steps", self.total_steps), ("weight_decay", self.decay.weight_decay)) if state[key] != now]
        if changed:
            raise ValueError(f"bame.attach: the state was saved under other arguments ({'; '.join(changed)}: saved "
                             f"-> now): attach with the arguments of the run it continues")
        self.method.load_state_dict(state["method"])
        self.ledger.load_state_dict(state["ledger"])
        self.recorders.load_state_dict(state["recorders"])
        self.step, self.phase = int(state["step"]), IDLE


def prepare(model: nn.Module, method: str = "bame", pattern: str | NMPattern = "2:4", *, total_steps: int,
            seed: int = 0, flops: bool = True, mask_flips: bool = True, block_state_every_adaptations: int = 1,
            sink: Any = None, **method_options: Any) -> Sparsifier:
    """Make ``model`` N:M under ``method`` (layers swapped in place); the :class:`Sparsifier` returned needs
    :meth:`Sparsifier.bind_optimizer` with an optimizer over the N:M model before its first step. For an
    optimizer that exists already use :func:`attach`; the arguments are :func:`attach`'s."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"bame.attach: total_steps must be a positive int (the optimizer steps of the whole "
                         f"schedule), got {total_steps!r}")
    cfg = method_config(method, pattern, method_options)
    instrument = from_dict({"instrument": {"flops": flops, "mask_flips": mask_flips,
                                           "block_state_every_adaptations": block_state_every_adaptations}},
                           "bame.attach").instrument
    # weight_decay: the optimizer's, known once it is bound (bind_optimizer); no method reads it before a step
    ctx = MethodContext(total_steps=total_steps, steps_per_epoch=total_steps, weight_decay=0.0, seed=seed)
    sparse_method = create_method(cfg, ctx)
    try:
        model = sparse_method.prepare(model)
    except ValueError as err:  # e.g. on_indivisible='error' on a layer whose K is no multiple of M
        raise ConfigError([f"bame.attach: pattern {cfg.pattern}: {err}"]) from None
    return Sparsifier(model, sparse_method, cfg, total_steps, instrument, sink if sink is not None else Records())


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "bame",
           pattern: str | NMPattern = "2:4", *, total_steps: int, seed: int = 0, flops: bool = True,
           mask_flips: bool = True, block_state_every_adaptations: int = 1, sink: Any = None,
           **method_options: Any) -> Sparsifier:
    """Make ``model`` N:M under ``method`` and return the :class:`Sparsifier` that a loop of your own calls
    each step (see the module docstring for what it does to ``model`` and ``optimizer``).

    ``total_steps``: the optimizer steps of the whole schedule (BAME's window and ``rho`` decay, ASP's prune
    step are fractions of it); ``seed``: for ``mask_init='random'``; ``flops``, ``mask_flips``,
    ``block_state_every_adaptations``: the ``instrument`` section; ``sink``: where the recorders write
    (default: in memory, ``sp.records``); ``method_options``: the ``method`` keys (``layout``,
    ``first_conv_dense``, ...) and the method's own (``rho=0.05``, ``interval_steps=100`` for bame).
    Raises :class:`bame.config.ConfigError` for a bad method, pattern or option, ``ValueError`` for an
    optimizer whose decay cannot be masked.
    """
    before = {name: dict(m.named_parameters(recurse=False)) for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    sp = prepare(model, method, pattern, total_steps=total_steps, seed=seed, flops=flops, mask_flips=mask_flips,
                 block_state_every_adaptations=block_state_every_adaptations, sink=sink, **method_options)
    swapped = {}  # id(the dense layer's parameter) -> the N:M layer's
    for name, params in before.items():
        now = dict(sp.model.get_submodule(name).named_parameters(recurse=False))
        swapped.update({id(p): now[key] for key, p in params.items() if now.get(key) is not p})
    _swap_parameters(optimizer, swapped)
    sp.bind_optimizer(optimizer)
    return sp
