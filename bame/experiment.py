"""``build(cfg) -> Experiment``: everything a run trains with, built from its config alone.

The model (made N:M by the method), the method, the optimizer (SGD, Adam or AdamW) with its parameter groups,
the LR scheduler, the FLOPs ledger and the recorders, on one device, for a schedule of known length. No data
is read and no run folder is made: the training loop (``bame.loop``), ``bame flops`` and the benchmarks all
start from here, so they train, count and time the same thing.

::

    exp = build(load_config("quick"))              # shapes from bame.data.specs, no data read
    outcome = training_step(0, exp.model, exp.method, exp.optimizer, exp.ledger, x, y)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import models
from .config import Config, ConfigError, TrainConfig
from .data.specs import DataShape, data_shape
from .flops import FlopsLedger, model_step_costs
from .instrument import NullSink, Recorders
from .methods import Method, MethodContext, create_method
from .optim import MaskedAdam
from .schedule import LRFactor, Schedule, plan_schedule
from .seed import rng_neutral

__all__ = ["Experiment", "build", "run_schedule", "method_context", "make_optimizer", "param_groups", "NORM_TYPES",
           "resolve_device", "describe_device", "dense_step_macs"]

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class Experiment:
    """What one run trains with (see :func:`build`)."""

    cfg: Config
    shape: DataShape
    schedule: Schedule
    model: nn.Module  # N:M layers swapped in, on the device, in the configured memory format
    method: Method  # prepared on ``model``; its optimizer attached
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ledger: FlopsLedger  # attached to ``model`` (counts nothing with instrument.flops false)
    recorders: Recorders  # writing to the sink given (nowhere by default)


def run_schedule(tc: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The run's lengths (:func:`bame.schedule.plan_schedule`) under ``tc``."""
    return plan_schedule(steps_per_epoch, tc.epochs, tc.max_steps, tc.warmup_epochs, tc.eval_every_epochs)


def method_context(tc: TrainConfig, sched: Schedule) -> MethodContext:
    return MethodContext(total_steps=sched.schedule_steps, steps_per_epoch=sched.steps_per_epoch,
                         weight_decay=tc.weight_decay, seed=tc.seed, optimizer=tc.optimizer)


def build(cfg: Config, *, shape: Optional[DataShape] = None, steps_per_epoch: Optional[int] = None,
          device: torch.device | str = "cpu", sink: Any = None) -> Experiment:
    """Build the model, method, optimizer, scheduler, ledger and recorders of ``cfg`` on ``device``.

    ``shape``: the data's (default :func:`bame.data.specs.data_shape`, without reading it); ``steps_per_epoch``:
    the training loader's length (default: ``shape.train_size // batch``, a loader that drops the last
    partial batch); ``sink``: where the recorders write (``append`` / ``save_arrays``; default nowhere).
    The model is created from the global RNG (seed it first). A model, method or pattern that cannot be
    built raises :class:`ConfigError` naming the key.
    """
    tc = cfg.train
    shape = shape or data_shape(cfg.data)
    sched = run_schedule(tc, steps_per_epoch or shape.train_size // tc.batch_size)
    try:
        model = models.create(cfg.model.name, num_classes=shape.num_classes, in_channels=shape.in_channels,
                              image_size=shape.image_size)
    except ValueError as err:  # an unknown name, a size the model cannot take, timm missing
        raise ConfigError([f"model.name: {err}"]) from None
    model = model.to(device)
    try:
        method = create_method(cfg.method, method_context(tc, sched))
    except ValueError as err:
        raise ConfigError([f"method.name: {err}"]) from None
    try:
        model = method.prepare(model)
    except ValueError as err:  # e.g. method.on_indivisible=error on a layer whose K is not a multiple of M
        keep = (" (method.on_indivisible=dense keeps such layers dense)"
                if cfg.method.on_indivisible == "error" else "")
        raise ConfigError([f"method.pattern {cfg.method.pattern}: {err}{keep}"]) from None
    if tc.channels_last:  # after prepare: the method reads masks through its layers, never stale copies
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, method.self_decayed_parameters(), tc.weight_decay, tc.no_decay_bn_bias,
                          method.own_parameters())
    optimizer = make_optimizer(tc, groups, method)
    method.attach_optimizer(optimizer)
    lr_factor = LRFactor(tc.lr_schedule, sched.schedule_steps, sched.warmup_steps, tc.step_milestones, tc.step_gamma,
                         tc.warmup_start_factor, tc.min_lr_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ledger = FlopsLedger(model, enabled=cfg.instrument.flops)
    recorders = Recorders(cfg.instrument, model, method, sink if sink is not None else NullSink())
    return Experiment(cfg, shape, sched, model, method, optimizer, scheduler, ledger, recorders)


def make_optimizer(tc: TrainConfig, groups: list[dict[str, Any]], method: Method) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups``: torch's SGD, or :class:`bame.optim.MaskedAdam` (Adam, AdamW) moving
    the method's N:M weights only where ``method.update_positions()`` says."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                               weight_decay=tc.weight_decay)
    return MaskedAdam(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay,
                      decoupled=tc.optimizer == "adamw", update_positions=method.update_positions)


def param_groups(model: nn.Module, self_decayed: list[nn.Parameter], weight_decay: float,
                 no_decay_bn_bias: bool, method_own: list[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Optimizer groups: ``decay``; ``no_decay`` (norm parameters, biases and the names the model lists in
    its ``no_weight_decay()``, as timm's ViT does for ``pos_embed`` and ``cls_token``); ``self_decayed`` (wd 0:
    the method applies masked decay to them); ``method`` (the method's own parameters outside the model, LBC's
    scores: the weights' decay, as LBC's code gives them). Empty groups are left out; shared parameters
    appear once."""
    mine = {id(p) for p in self_decayed}
    declared = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else set()
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "self_decayed": []}
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if id(p) in mine:
                groups["self_decayed"].append(p)
            elif no_decay_bn_bias and (isinstance(module, NORM_TYPES) or name == "bias"
                                       or f"{prefix}.{name}".lstrip(".") in declared):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
    missing = mine - seen
    if missing:
        raise ValueError(f"{len(missing)} self-decayed parameters of the method are not in the model")
    groups["method"] = [p for p in method_own if id(p) not in seen]
    wd = {"decay": weight_decay, "no_decay": 0.0, "self_decayed": 0.0, "method": weight_decay}
    return [{"params": ps, "weight_decay": wd[k], "name": k} for k, ps in groups.items() if ps]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. A CUDA device without an index is ``LOCAL_RANK``'s under
    torchrun (one GPU per process, whether or not the caller ran ``torch.cuda.set_device``), else the
    current device."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError([f"train.device: {name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N' "
                           f"(N the GPU's index)"]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"train.device: {name!r} asked for but CUDA is not available (use 'auto' or 'cpu')"])
    if device.type == "cuda" and device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device("cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device())
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def dense_step_macs(cfg: Config, shape: DataShape, batch: int, device: torch.device | str = "cpu") -> int:
    """MACs of one dense training step of ``cfg``'s architecture at ``batch`` images (counted by the ledger
    on a batch of one, scaled linearly: MACs are linear in the batch), for ``x dense`` ratios. Moves no RNG."""
    with rng_neutral(device):
        dense = models.create(cfg.model.name, num_classes=shape.num_classes, in_channels=shape.in_channels,
                              image_size=shape.image_size)
        costs = model_step_costs(dense, (1, shape.in_channels, shape.image_size, shape.image_size))
    return int(costs.step.ideal_macs) * batch
