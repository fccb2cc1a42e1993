"""One optimizer step in the order of docs/contracts.md, shared by the training loop and the benchmarks.

``training_step`` is the step of ``bame.train`` without the data loading, logging and checkpoints around
it; use it to time or instrument steps on a fixed batch::

    method.attach_optimizer(opt)
    ledger = FlopsLedger(model)
    for t in range(steps):
        outcome = training_step(t, model, method, opt, ledger, x, y)

The order: ``method.before_step`` (BAME applies a pending mask update), ``ledger.begin_step``, forward
and loss (under ``autocast``), backward (scaled, then unscaled, with a ``GradScaler``: the method sees true
gradients), ``method.after_backward`` (gradient masking, decay, scoring on adaptation steps), the
element-wise work of the step's mask decisions charged to the ledger (``method.mask_work_ops``), gradient
clipping (``clip_grad_norm``: the masked, unscaled gradients), the optimizer (and LR scheduler) step,
``method.after_optimizer_step``, the ``after_update`` callback on adaptation steps (the loop checks that
masks agree across ranks there), ``ledger.end_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .flops import FlopsLedger, StepCost
from .methods import AdaptationRecord, Method

__all__ = ["StepOutcome", "training_step"]


@dataclass
class StepOutcome:
    """What one step produced; the tensors are detached and stay on the device (no host sync)."""

    loss: torch.Tensor  # scalar, the criterion's value
    output: torch.Tensor  # the model's output (logits)
    cost: StepCost  # the ledger's account of the step (zero when the ledger is disabled)
    adaptation: Optional[AdaptationRecord]  # the method's record when this step adapted the masks
    grad_norm: Optional[torch.Tensor] = None  # scalar: the gradients' total L2 norm before clipping (None: no clipping)


def training_step(step: int, model: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                  ledger: FlopsLedger, x: torch.Tensor, y: torch.Tensor,
                  criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                  *, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  scaler: Optional[torch.amp.GradScaler] = None,
                  scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                  after_update: Optional[Callable[[int], None]] = None,
                  clip_grad_norm: Optional[float] = None) -> StepOutcome:
    """Run optimizer step ``step`` (0-based, global) of ``method`` on the batch ``(x, y)``.

    ``model`` is what the forward runs through (the bare model or its DDP wrapper); ``autocast`` returns a
    fresh autocast context (``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``); ``scaler`` is the
    fp16 ``GradScaler``; ``scheduler`` steps after the optimizer; ``after_update(step)`` runs after
    ``method.after_optimizer_step`` on steps that adapted the masks; ``clip_grad_norm`` scales the gradients
    of ``model``'s parameters to that total L2 norm at most (after the method masked them, so BAME's
    candidate gradients never count; with non-finite gradients the fp16 scaler skips the step, clipped or
    not).
    """
    method.before_step(step)
    ledger.begin_step()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        output = model(x)
        loss = criterion(output, y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the method must see true gradients
    else:
        loss.backward()
    method.after_backward(step)
    adaptation = method.last_adaptation
    ledger.charge_adaptation(method.mask_work_ops())
    grad_norm = None
    if clip_grad_norm is not None:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    method.after_optimizer_step(step)
    if adaptation is not None and after_update is not None:
        after_update(step)
    cost = ledger.end_step()
    return StepOutcome(loss.detach(), output.detach(), cost, adaptation, grad_norm)
