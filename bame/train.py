"""The one training loop, for every method (it never asks which method it runs).

``train(cfg)`` builds data, model and method, trains with SGD, evaluates, and writes a run folder
(``bame.runs``). The step order is the one of docs/contracts.md::

    method.before_step(step); ledger.begin_step()
    loss = criterion(model(x), y); loss.backward()          # (fp16: scaled, then unscaled here)
    method.after_backward(step)                              # sees unscaled gradients
    ledger.charge_adaptation(...) if the method adapted
    optimizer.step(); scheduler.step()
    method.after_optimizer_step(step)
    ledger.end_step(); recorders.on_step_end(step)

Lengths (one rule, in optimizer steps; ``S`` = ``len(train_loader)`` steps per epoch):

- **schedule length** = ``ceil(train.epochs * S)``: the LR schedule and the method's windows
  (``MethodContext.total_steps``) follow it. When ``train.epochs <= 0`` (only allowed with
  ``train.max_steps``) the schedule length is ``train.max_steps``.
- **run length** = ``min(schedule length, train.max_steps)``: where this run stops. A run stopped by
  ``max_steps`` is the prefix of the full schedule, and can be resumed to a larger ``max_steps``.

Evaluation (top-1 and cross-entropy on the test set, without label smoothing) runs every
``train.eval_every_epochs`` and at the end, with the FLOPs ledger paused and without moving any RNG,
so it never changes the training trajectory. Checkpoints (``checkpoints/last.pt``) are written at
every epoch end, every ``train.checkpoint_every_steps`` and at the end; a resumed run continues from
the last one and reproduces the uninterrupted run exactly on the same machine (the epoch's shuffled
order is rebuilt from the loader's RNG state at the epoch start and the consumed batches skipped).

Around the loop (docs/run_folders.md): the run folder is locked for the whole call (``bame.runlock``);
checks that need the built model run before the folder exists (``bame.preflight``); a resume checks the
checkpoint's own config first (``bame.resume``); ``bame.divergence`` stops a run whose loss stays
non-finite (status ``diverged``); SIGTERM, SIGUSR1 and Ctrl-C stop it at the end of a step with a
checkpoint (``bame.signals``).

Distributed: everything rank-dependent goes through :class:`DistContext`; only rank 0 writes, and
``torch.distributed`` is used only when it is initialised (torchrun).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterator

import torch
from torch import nn

from . import preflight
from .config import Config, ConfigError, TrainConfig, apply_overrides, from_dict, load_config, to_dict
from .distributed import all_sum_ints, average_float_buffers, check_masks_agree
from .divergence import DivergedError, Divergence, DivergenceGuard, nonfinite_entries
from .resume import RESUMABLE_CHANGES, ResumeError, check_resume_point, resume_config
from .runlock import RunLock
from .runs import NullWriter, RunReader, RunWriter, load_run
from .signals import StopRequested, StopSignals
from .step import training_step
from .seed import capture_rng, deterministic_mode, restore_rng, rng_neutral, seed_everything

__all__ = ["train", "RunResult", "DistContext", "Schedule", "plan_schedule", "LRFactor", "param_groups",
           "resolve_device", "ResumeError", "resume_config", "RESUMABLE_CHANGES"]

CHECKPOINT_FORMAT = 2  # 2: plain data only (RNG states as tensors): loads with torch.load(weights_only=True)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


# --------------------------------------------------------------------------------------------------
# small pieces (pure, tested on their own)


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (1 process unless torchrun initialised torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> DistContext:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (identity for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


@dataclass(frozen=True)
class Schedule:
    """Lengths in optimizer steps (see the module docstring for the rule)."""

    steps_per_epoch: int
    schedule_steps: int  # LR schedule and method windows
    run_steps: int  # where this run stops
    warmup_steps: int
    eval_interval_steps: int  # 0: evaluate only at the end


def plan_schedule(tc: TrainConfig, steps_per_epoch: int) -> Schedule:
    """Schedule length = ceil(epochs * steps_per_epoch) (max_steps when epochs <= 0); run length = min(that, max_steps)."""
    if steps_per_epoch < 1:
        raise ValueError("the training set gives no batch: is it empty, or smaller than one batch with drop_last?")
    if tc.epochs > 0:
        # ceil: a fractional epoch still takes its partial steps (rounded first: 1.1 * 10 is 11.000000000000002)
        schedule = max(1, math.ceil(round(tc.epochs * steps_per_epoch, 6)))
    elif tc.max_steps is not None:
        schedule = tc.max_steps
    else:
        raise ConfigError(["train.epochs: must be > 0 (or set train.max_steps)"])
    run = min(schedule, tc.max_steps) if tc.max_steps is not None else schedule
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch)) if tc.eval_every_epochs > 0 else 0
    return Schedule(steps_per_epoch, schedule, run, warmup, eval_every)


class LRFactor:
    """LR multiplier at optimizer step ``t`` (0-based): linear warm-up, then cosine / step / constant.

    Warm-up: ``(t + 1) / warmup_steps`` for ``t < warmup_steps``. Cosine: ``0.5 (1 + cos(pi p))`` with
    ``p = (t - warmup) / (total - warmup)``. Step: ``gamma ** #{milestones m : t >= m * total}``.
    A callable object (not a lambda) so that ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0,
                 milestones: tuple[float, ...] = (), gamma: float = 0.1) -> None:
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            p = min(1.0, (t - self.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if t >= m * self.total_steps)
        if self.kind == "constant":
            return 1.0
        raise ValueError(f"unknown lr_schedule {self.kind!r}")


def param_groups(model: nn.Module, self_decayed: list[nn.Parameter], weight_decay: float,
                 no_decay_bn_bias: bool) -> list[dict[str, Any]]:
    """SGD groups: ``decay``; ``no_decay`` (norm parameters and biases); ``self_decayed`` (wd 0: the
    method applies masked decay to them). Empty groups are left out; shared parameters appear once."""
    mine = {id(p) for p in self_decayed}
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "self_decayed": []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if id(p) in mine:
                groups["self_decayed"].append(p)
            elif no_decay_bn_bias and (isinstance(module, NORM_TYPES) or name == "bias"):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
    missing = mine - seen
    if missing:
        raise ValueError(f"{len(missing)} self-decayed parameters of the method are not in the model")
    wd = {"decay": weight_decay, "no_decay": 0.0, "self_decayed": 0.0}
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


# --------------------------------------------------------------------------------------------------
# result


@dataclass
class RunResult:
    """What :func:`train` returns: where the run is and its headline numbers."""

    run_dir: Optional[Path]
    run_id: Optional[str]
    status: str
    steps: int
    epochs: float
    test_acc: Optional[float]
    test_loss: Optional[float]
    best_test_acc: Optional[float]
    train_loss: Optional[float]
    ideal_macs: int
    executed_macs: int
    wall_time_s: float
    summary: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = field(default=None, repr=False)  # the trained model (masks included)

    def reader(self) -> RunReader:
        """The run folder, for its tables (``.table('metrics')`` is a DataFrame)."""
        if self.run_dir is None:
            raise ValueError("this process wrote no run folder (not rank 0)")
        return load_run(self.run_dir)


# --------------------------------------------------------------------------------------------------
# the loop


def _unpack_loaders(loaders: Any) -> tuple[Any, Any]:
    if isinstance(loaders, (tuple, list)):
        return loaders[0], loaders[1]
    return loaders.train, loaders.test


class _Trainer:
    """State of one training run; ``train()`` is its only user."""

    def __init__(self, cfg: Config, dist: DistContext, device: torch.device, verbose: bool, progress: bool):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.verbose, self.progress = verbose and dist.is_main, progress and dist.is_main
        tc = cfg.train
        # Autocast on the run's device: CUDA, or the CPU (fast only where it has bf16/fp16 matrix units).
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
        if self.amp_dtype is not None and not torch.amp.is_autocast_available(device.type):
            warnings.warn(f"train.amp={tc.amp!r}: torch has no autocast for {device.type!r}; training in float32",
                          stacklevel=3)
            self.amp_dtype = None
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.writer: Any = NullWriter()
        self.step = 0
        self.epoch_rng: Optional[dict] = None  # RNG state at the start of the current epoch
        self.wall_offset = 0.0  # wall time of earlier segments (resume)
        self.best_test_acc: Optional[float] = None
        self.last_test: dict[str, Optional[float]] = {"loss": None, "acc": None}
        self.last_train: dict[str, Optional[float]] = {"loss": None, "acc": None}
        self.last_step_ideal = 0
        self.last_step_adaptation = 0  # the adaptation line's share of last_step_ideal
        self.scalars: dict[str, float] = {}
        self.global_macs: tuple[int, int] = (0, 0)  # run totals summed over ranks (set by summary())
        self.guard = DivergenceGuard(tc.nan_patience, device)
        self.signals: Optional[StopSignals] = None  # set while the loop runs under StopSignals
        self.checkpointed_step: Optional[int] = None  # the step of the last checkpoint written (or loaded)
        self.scale = None  # the fp16 GradScaler's scale before the step (a drop means it skipped the step)

    # -- set-up ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Data, model, method, optimizer, scheduler, ledger (everything but the run folder)."""
        from . import data as data_mod
        from . import methods as methods_mod
        from . import models as models_mod
        from .flops import FlopsLedger

        cfg, tc = self.cfg, self.cfg.train
        self.bundle = data_mod.build_datasets(cfg.data)
        try:
            loaders = data_mod.make_loaders(self.bundle, tc.batch_size, tc.eval_batch_size, cfg.data.num_workers,
                                            tc.seed, distributed=self.dist.distributed,
                                            pin_memory=self.device.type == "cuda")
        except ValueError as err:
            raise ConfigError([f"train.batch_size: {err}"]) from None
        self.train_loader, self.test_loader = _unpack_loaders(loaders)
        self.sched = plan_schedule(tc, len(self.train_loader))
        try:
            model = models_mod.create(cfg.model.name, num_classes=self.bundle.num_classes,
                                      in_channels=self.bundle.in_channels)
        except ValueError as err:
            raise ConfigError([f"model.name: {err}"]) from None
        model = model.to(self.device)
        ctx = methods_mod.MethodContext(total_steps=self.sched.schedule_steps,
                                        steps_per_epoch=self.sched.steps_per_epoch,
                                        weight_decay=tc.weight_decay, seed=tc.seed)
        try:
            self.method = methods_mod.create_method(cfg.method, ctx)
        except ValueError as err:
            raise ConfigError([f"method.name: {err}"]) from None
        try:
            model = self.method.prepare(model)
        except ValueError as err:  # e.g. method.on_indivisible=error on a layer whose K is not a multiple of M
            keep = (" (method.on_indivisible=dense keeps such layers dense)"
                    if cfg.method.on_indivisible == "error" else "")
            raise ConfigError([f"method.pattern {cfg.method.pattern}: {err}{keep}"]) from None
        preflight.check_pattern_fits(getattr(self.method, "report", None), cfg)
        # After prepare: the method reads masks through its layers (layer.mask), never stale copies.
        self.model = model.to(memory_format=self.memory_format) if tc.channels_last else model
        b = self.bundle
        preflight.check_model_runs(self.model, (1, b.in_channels, b.image_size, b.image_size), cfg, self.device,
                                   self.autocast)
        groups = param_groups(self.model, self.method.self_decayed_parameters(), tc.weight_decay,
                              tc.no_decay_bn_bias)
        self.optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                                         weight_decay=tc.weight_decay)
        self.method.attach_optimizer(self.optimizer)
        self.lr_factor = LRFactor(tc.lr_schedule, self.sched.schedule_steps, self.sched.warmup_steps,
                                  tc.step_milestones, tc.step_gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
        self.ledger = FlopsLedger(self.model, enabled=self.cfg.instrument.flops)
        from .instrument import Recorders

        self.recorders = Recorders(cfg.instrument, self.model, self.method, NullWriter())  # sink: attach_writer
        # Training forwards go through ``self.net``: the model itself, or its DDP wrapper under torchrun
        # (gradients are all-reduced during backward, so the method's after_backward sees global ones).
        # Hooks, checkpoints and evaluation use the bare model. No buffer broadcast: masks are equal on
        # every rank by construction (checked, ``train.check_mask_sync``) and BN statistics are averaged
        # before evaluations and checkpoints (bame.distributed explains why).
        self.net = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)

    def attach_writer(self, writer: Any) -> None:
        self.writer = writer
        self.recorders.sink = writer

    def write_sparsify(self) -> None:
        report = getattr(self.method, "report", None)
        if report is not None:
            rows = report.to_rows()
        else:
            rows = [dict(name=n, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
                         shape="x".join(map(str, m.weight.shape)), sparse=False,
                         reason=f"method {self.cfg.method.name!r} keeps every layer dense")
                    for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.writer.append_rows("sparsify", rows)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        spe = self.sched.steps_per_epoch
        into = self.step % spe
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method": self.method.state_dict(),
            "ledger": self.ledger.state_dict(),
            "recorders": self.recorders.state_dict(),
            "rng": capture_rng(self.train_loader),
            "epoch_rng": self.epoch_rng if into else None,
            "step": self.step,
            "epoch": self.step // spe,
            "batches_into_epoch": into,
            "steps_per_epoch": spe,
            "schedule_steps": self.sched.schedule_steps,
            "wall_time_s": self.wall_time(),
            "best_test_acc": self.best_test_acc,
            "last_test": self.last_test,
            "last_train": self.last_train,
            "tables": self.writer.table_rows() if self.dist.is_main else {},
            "config": to_dict(self.cfg),
            "divergence": self.guard.state_dict(),
        }

    def save_checkpoint(self) -> None:
        """``checkpoints/last.pt`` (rank 0); skipped while the loss is not finite, so that the last
        checkpoint stays one a resume or an export can use."""
        if self.guard.in_streak():
            self.say(f"step {self.step}: no checkpoint (the loss is not finite); the last one stays")
            return
        if self.dist.is_main:
            self.writer.save_checkpoint(self.state())
            self.writer.update_manifest(checkpoint_step=self.step)
        self.checkpointed_step = self.step

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore everything from a checkpoint (RNG last)."""
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.ledger.load_state_dict(ckpt["ledger"])
        self.recorders.load_state_dict(ckpt["recorders"])
        self.step = int(ckpt["step"])
        self.epoch_rng = ckpt.get("epoch_rng")
        self.wall_offset = float(ckpt.get("wall_time_s", 0.0))
        self.best_test_acc = ckpt.get("best_test_acc")
        self.last_test = ckpt.get("last_test", self.last_test)
        self.last_train = ckpt.get("last_train", self.last_train)
        if ckpt.get("divergence") is not None:
            self.guard.load_state_dict(ckpt["divergence"])
        self.checkpointed_step = self.step
        restore_rng(ckpt["rng"], self.train_loader)

    # -- helpers -----------------------------------------------------------------------------------
    def wall_time(self) -> float:
        return self.wall_offset + (time.perf_counter() - self.t0)

    def say(self, msg: str) -> None:
        if self.verbose:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 and mean cross-entropy on the test set; no FLOPs charged, no RNG moved."""
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        with self.ledger.paused(), rng_neutral(self.device):
            for x, y in self.test_loader:
                x, y = self._to_device(x, y)
                with self.autocast():
                    out = self.model(x)
                loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
                correct += (out.argmax(1) == y).sum()
                count += y.numel()
        for t in (loss_sum, correct, count):
            self.dist.all_sum(t)
        self.model.train(was_training)
        n = max(1, int(count))
        return {"loss": float(loss_sum) / n, "acc": int(correct) / n}

    # -- rows --------------------------------------------------------------------------------------
    def _row(self, split: str, loss: Optional[float], acc: Optional[float]) -> dict[str, Any]:
        # FLOPs: each rank's ledger counts its own shard; the run's work is their sum (a collective).
        flops = self.run_flops()
        step_ideal, cum_ideal, cum_executed = flops["step_ideal"], flops["ideal"], flops["executed"]
        row = {
            "step": self.step,
            "epoch": self.step / self.sched.steps_per_epoch,
            "split": split,
            "lr": self.lr(),
            "loss": loss,
            "acc": acc,
            "wall_time_s": round(self.wall_time(), 3),
            "step_ideal_macs": step_ideal if split == "train" else None,
            "cum_ideal_macs": cum_ideal,
            "cum_executed_macs": cum_executed,
        }
        if split == "train":
            row.update(self.scalars)
        return row

    def flush_flops(self) -> None:
        # ``epoch``: the (0-based) epoch of the last step taken; ``step``: steps completed.
        rows = self.ledger.epoch_rows(max(0, self.step - 1) // self.sched.steps_per_epoch, self.step)
        if self.dist.distributed:  # every rank has the same rows (same layers, phases, batch size): sum them
            sums = all_sum_ints([v for r in rows for v in (r["ideal_macs"], r["executed_macs"])])
            for i, r in enumerate(rows):
                once = r["phase"] == "adaptation"  # replicated on every rank: ideal once (run_flops)
                r["ideal_macs"] = sums[2 * i] // self.dist.world_size if once else sums[2 * i]
                r["executed_macs"] = sums[2 * i + 1]
        self.writer.append_rows("flops", rows)

    def run_eval(self) -> None:
        res = self.evaluate()
        self.last_test = res
        if self.best_test_acc is None or res["acc"] > self.best_test_acc:
            self.best_test_acc = res["acc"]
        self.writer.append("metrics", self._row("test", res["loss"], res["acc"]))
        self.say(f"step {self.step}/{self.sched.run_steps} (epoch {self.step / self.sched.steps_per_epoch:.2f}): "
                 f"test acc {res['acc']:.4f} loss {res['loss']:.4f}, train loss {_num(self.last_train['loss'])}")

    # -- the loop ----------------------------------------------------------------------------------
    def epochs(self) -> Iterator[Iterator]:
        """One batch iterator per epoch from ``self.step`` on; a resume mid-epoch rebuilds the epoch's
        shuffled order from its starting RNG state and skips the batches already consumed."""
        loader, spe = self.train_loader, self.sched.steps_per_epoch
        while self.step < self.sched.run_steps:
            epoch, into = divmod(self.step, spe)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if into == 0:
                self.epoch_rng = capture_rng(loader)
                yield iter(loader)
                continue
            if self.epoch_rng is None:
                raise ResumeError("the checkpoint lacks the RNG state of its epoch start")
            now = capture_rng(loader)
            restore_rng(self.epoch_rng, loader)
            it = iter(loader)
            for _ in range(into):  # fetch and drop: the workers' RNG streams advance as before
                next(it)
            restore_rng(now, loader)
            yield it

    def train_loop(self) -> None:
        tc, sched = self.cfg.train, self.sched
        model, method, opt, ledger = self.net, self.method, self.optimizer, self.ledger
        from tqdm.auto import tqdm

        bar = tqdm(total=sched.run_steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=self.writer.id or "train", unit="step")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = torch.zeros((), dtype=torch.int64, device=self.device)
        self.scale = self.scaler.get_scale() if self.scaler is not None else None
        model.train()
        try:
            for batches in self.epochs():
                for x, y in batches:
                    step = self.step
                    x, y = self._to_device(x, y)
                    outcome = training_step(step, model, method, opt, ledger, x, y, self.criterion,
                                            autocast=self.autocast, scaler=self.scaler, scheduler=self.scheduler,
                                            after_update=self._check_masks if tc.check_mask_sync else None)
                    loss, out, cost = outcome.loss, outcome.output, outcome.cost
                    self.guard.observe(step + 1, loss, skipped=self._scaler_skipped())
                    self.last_step_ideal = cost.ideal_macs
                    self.last_step_adaptation = cost.by_phase.get("adaptation", (0, 0))[0]
                    scalars = self.recorders.on_step_end(step)
                    if scalars:
                        self.scalars.update(scalars)
                    with torch.no_grad():
                        loss_sum += loss.double() * y.numel()
                        correct += (out.argmax(1) == y).sum()
                        seen += y.numel()
                    self.step = step + 1
                    bar.update(1)
                    self.after_step(bar, loss_sum, correct, seen)
                    if self.step >= sched.run_steps:
                        break
        finally:
            bar.close()

    def _check_masks(self, step: int) -> None:
        check_masks_agree(self.model, step)  # collective; no-op for one process

    def _scaler_skipped(self) -> bool:
        """Whether the fp16 GradScaler skipped the step just taken (inf/NaN gradients: it lowers its scale).
        One host read per step, only with a scaler, whose ``step`` reads the same flags already."""
        if self.scaler is None:
            return False
        before, self.scale = self.scale, self.scaler.get_scale()
        return before is not None and self.scale < before

    def check_divergence(self) -> None:
        """Raise :class:`DivergedError` once the loss has not been finite for ``train.nan_patience`` steps
        (on any rank: the ranks agree, so that they all stop at the same step)."""
        found = self.guard.verdict()
        if self.dist.distributed:
            anywhere = self.dist.all_sum(torch.tensor([float(found is not None)], device=self.device))
            if found is None and float(anywhere[0]) > 0:
                raise DivergedError(f"diverged at step {self.step} on another rank (train.nan_patience="
                                    f"{self.guard.patience})")
        if found is not None:
            raise DivergedError(found)

    def stop_signal(self, at_log_step: bool) -> Optional[int]:
        """The stop signal received (SIGTERM, SIGUSR1, SIGINT), if any. Under torchrun the ranks agree on
        it only at log steps (one tiny all-reduce there), so that they all stop after the same step."""
        signum = self.signals.signum if self.signals is not None else None
        if not self.dist.distributed:
            return signum
        if not at_log_step:
            return None
        flag = self.dist.all_sum(torch.tensor([float(signum or 0)], device=self.device))
        return (signum or signal.SIGTERM) if float(flag[0]) > 0 else None

    def after_step(self, bar: Any, loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor) -> None:
        """Logging, the divergence guard, evaluation, checkpoints and stop signals due after the step taken."""
        tc, sched, s = self.cfg.train, self.sched, self.step
        epoch_end = s % sched.steps_per_epoch == 0
        last = s >= sched.run_steps
        log = s % tc.log_every_steps == 0 or epoch_end or last
        if log:
            stats = torch.stack([loss_sum, correct.double(), seen.double()])
            self.dist.all_sum(stats)
            n = max(1.0, float(stats[2]))
            self.last_train = {"loss": float(stats[0]) / n, "acc": float(stats[1]) / n}
            loss_sum.zero_(), correct.zero_(), seen.zero_()
            self.writer.append("metrics", self._row("train", self.last_train["loss"], self.last_train["acc"]))
            bar.set_postfix(loss=f"{self.last_train['loss']:.4f}", lr=f"{self.lr():.4g}", refresh=False)
        evaluate = bool(sched.eval_interval_steps and s % sched.eval_interval_steps == 0) or last
        checkpoint = epoch_end or last or bool(tc.checkpoint_every_steps and s % tc.checkpoint_every_steps == 0)
        if log or checkpoint or (self.guard.patience and s % self.guard.patience == 0):
            self.check_divergence()
        if evaluate or checkpoint:
            average_float_buffers(self.model)  # BN statistics of the ranks' shards (no-op for one process)
        if evaluate:
            self.run_eval()
        if checkpoint:
            self.flush_flops()
            self.save_checkpoint()
        signum = None if last else self.stop_signal(log)
        if signum is not None:
            if self.checkpointed_step != s:
                average_float_buffers(self.model)
                self.flush_flops()
                self.save_checkpoint()
            raise StopRequested(signum)

    def dense_step_macs(self) -> Optional[int]:
        """MACs of one dense training step of the same architecture at this batch size (counted by the
        ledger on a batch of one, scaled linearly: MACs are linear in the batch), for ``x dense`` ratios."""
        from . import models as models_mod
        from .flops import model_step_costs

        b = self.bundle
        with rng_neutral(self.device):
            dense = models_mod.create(self.cfg.model.name, num_classes=b.num_classes, in_channels=b.in_channels)
            costs = model_step_costs(dense, (1, b.in_channels, b.image_size, b.image_size))
        return int(costs.step.ideal_macs) * self.cfg.train.batch_size * self.dist.world_size

    def run_flops(self) -> dict[str, Any]:
        """The ledger's counts for the whole run, summed over ranks (a collective under torchrun).

        Each rank's ledger counts the conv/linear work of its own shard of every global batch, so their
        sum is the run's work. The mask-adaptation line is different: every rank scores and selects the
        same blocks (replicated, so that no mask needs to be sent); the run *needed* it once (ideal: once)
        and *ran* it on every rank (executed: the sum).
        """
        led = self.ledger
        by_phase = {k: list(v[:2]) for k, v in getattr(led, "total_by_phase", {}).items()}
        adapt_i = by_phase.get("adaptation", [0, 0])[0]
        sums = all_sum_ints([self.last_step_ideal, self.last_step_adaptation, led.total_ideal_macs,
                             led.total_executed_macs, adapt_i] + [v for k in by_phase for v in by_phase[k]])
        w = self.dist.world_size
        step_ideal, step_adapt, ideal, executed, adapt_all = sums[:5]
        once = adapt_all - adapt_all // w  # the replicated copies of the adaptation line's ideal count
        phases = {k: [sums[5 + 2 * i], sums[6 + 2 * i]] for i, k in enumerate(by_phase)}
        if "adaptation" in phases:
            phases["adaptation"][0] //= w
        return {"step_ideal": step_ideal - (step_adapt - step_adapt // w), "ideal": ideal - once,
                "executed": executed, "by_phase": {k: tuple(v) for k, v in phases.items()}}

    def summary(self, status: str = "completed", divergence: Optional[Divergence] = None) -> dict[str, Any]:
        from .flops import CONVENTION

        flops = self.run_flops()
        ideal, executed, by_phase = flops["ideal"], flops["executed"], flops["by_phase"]
        self.global_macs = (ideal, executed)
        dense = self.dense_step_macs() * self.step if self.cfg.instrument.flops else None
        report = getattr(self.method, "report", None)
        return {
            "run_id": self.writer.id,
            "status": status,
            "config_name": self.cfg.name,
            "method": self.cfg.method.name,
            "pattern": str(self.cfg.method.pattern),
            "seed": self.cfg.train.seed,
            "steps": self.step,
            "epochs": self.step / self.sched.steps_per_epoch,
            "steps_per_epoch": self.sched.steps_per_epoch,
            "schedule_steps": self.sched.schedule_steps,
            "final": {"test_acc": self.last_test["acc"], "test_loss": self.last_test["loss"],
                      "train_loss": self.last_train["loss"], "train_acc": self.last_train["acc"]},
            "best_test_acc": self.best_test_acc,
            "flops": {
                "convention": CONVENTION,
                "enabled": self.cfg.instrument.flops,
                "ideal_macs": ideal,
                "executed_macs": executed,
                "ideal_flops": 2 * ideal,
                "executed_flops": 2 * executed,
                "by_phase": {k: {"ideal_macs": int(v[0]), "executed_macs": int(v[1])} for k, v in by_phase.items()},
                # dense training of the same model for the same steps and global batch, and the ratio
                "dense_macs": dense,
                "ideal_x_dense": ideal / dense if dense else None,
                # summed over this many ranks' ledgers; adaptation (replicated per rank): ideal once
                "ranks_summed": self.dist.world_size,
            },
            "sparsify": {"sparse_layers": len(report.sparse_names), "dense_layers": len(report.dense_names)}
            if report is not None else None,
            "wall_time_s": round(self.wall_time(), 3),
            "device": describe_device(self.device),
            "world_size": self.dist.world_size,
            **({"diverged": divergence.to_dict()} if divergence is not None else {}),
        }

    def result(self, status: str, summary: Optional[dict] = None) -> RunResult:
        return RunResult(
            run_dir=self.writer.path, run_id=self.writer.id, status=status, steps=self.step,
            epochs=self.step / self.sched.steps_per_epoch, test_acc=self.last_test["acc"],
            test_loss=self.last_test["loss"], best_test_acc=self.best_test_acc,
            train_loss=self.last_train["loss"], ideal_macs=self.global_macs[0],
            executed_macs=self.global_macs[1], wall_time_s=self.wall_time(),
            summary=summary or {}, model=self.model)


def _ending_note(writer: RunWriter, status: str, step: int) -> str:
    ckpt = writer.manifest.get("checkpoint_step")
    entry = (writer.manifest.get("resumes") or [{}])[-1]
    more = (f" --set train.max_steps={entry['max_steps']}" if writer.extends_completed and entry.get("max_steps")
            else "")
    how = (f"continue from its checkpoint at step {ckpt} with: bame train --resume {writer.path}{more}"
           if ckpt is not None else "it has no checkpoint yet")
    if writer.extends_completed:
        return (f"run {writer.id}: the extension {status} at step {step}; the run stays completed at step "
                f"{entry.get('from_step')} (DONE and summary.json kept); {how}")
    return f"run {writer.id} {status} at step {step} (manifest status {status!r}, no DONE); {how}"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def _coerce_config(cfg: Any) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return from_dict(cfg)
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    raise TypeError(f"config must be a Config, a dict or a YAML path, got {type(cfg).__name__}")


def train(cfg: Config | dict | str | Path | None = None, out_dir: str | Path = "runs",
          resume: str | Path | None = None, *, overrides: Optional[list[str]] = None,
          command: Optional[list[str]] = None, progress: Optional[bool] = None,
          verbose: bool = True) -> RunResult:
    """Train one run and write its folder under ``out_dir``; returns a :class:`RunResult`.

    ``cfg``: a :class:`Config`, a dict or a YAML path (``overrides`` are ``key=value`` strings applied
    on top). ``resume``: a run folder to continue in place from its last checkpoint; the config is
    then the one the checkpoint was trained under (``cfg``/``overrides`` may change only
    ``bame.resume.RESUMABLE_CHANGES``, e.g. ``train.max_steps``). ``progress`` overrides ``train.progress``.

    The folder is locked for the whole call (``bame.runlock``): a second process gets ``RunLockedError``.
    Raises :class:`ConfigError` / :class:`ResumeError` / ``RunFolderError`` / ``CheckpointError`` /
    ``bame.data.DatasetNotFoundError`` before any folder is made or changed. A run whose loss stays
    non-finite for ``train.nan_patience`` steps ends ``diverged`` (returned, ``status='diverged'``). An
    exception during training marks the run ``failed`` and propagates; Ctrl-C, SIGTERM and SIGUSR1 save a
    checkpoint at the end of the step, mark it ``interrupted`` and raise ``StopRequested`` (a
    ``KeyboardInterrupt``).
    """
    dist = DistContext.current()
    lock = None
    if resume is not None and dist.is_main:
        load_run(resume)  # a one-line RunNotFoundError for a path that is not a run folder
        lock = RunLock.acquire(resume)  # before anything else: one process per folder
    try:
        return _train(cfg, out_dir, resume, lock, overrides, command, progress, verbose, dist)
    finally:
        if lock is not None:
            lock.release()


def _load_for_resume(trainer: _Trainer, reader: RunReader, ckpt: dict[str, Any]) -> None:
    """Restore the trainer from the checkpoint before the folder changes: a checkpoint that does not fit
    the model and method this config builds is refused, the folder untouched."""
    try:
        trainer.load(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        text = " ".join(str(err).split())[:300]
        raise ResumeError(f"{reader.checkpoint_path}: does not fit the model and method of "
                          f"{reader.path / 'config.yaml'} ({type(err).__name__}: {text})") from None


def _open_writer(trainer: _Trainer, cfg: Config, out_dir: str | Path, resume: Optional[RunReader],
                 ckpt: Optional[dict], lock: Optional[RunLock], command: list[str], device: torch.device) -> Any:
    if not trainer.dist.is_main:
        return NullWriter()
    if resume is None:
        return RunWriter.create(out_dir, cfg, command=command, device=describe_device(device),
                                extra={"world_size": trainer.dist.world_size, "schedule": vars(trainer.sched)})
    writer = RunWriter.reopen(resume.path, lock, command=command, device=describe_device(device),
                              from_step=int(ckpt["step"]), to_step=trainer.sched.run_steps)
    writer.manifest["resumes"][-1]["dropped_rows"] = writer.truncate_tables(ckpt.get("tables", {}))
    writer.manifest["resumes"][-1]["max_steps"] = cfg.train.max_steps
    if not writer.extends_completed:
        writer.write_config(cfg)  # max_steps may have changed (an extension writes it when it completes)
    writer.write_manifest()
    return writer


def _train(cfg: Any, out_dir: str | Path, resume: Optional[str | Path], lock: Optional[RunLock],
           overrides: Optional[list[str]], command: Optional[list[str]], progress: Optional[bool], verbose: bool,
           dist: DistContext) -> RunResult:
    reader, ckpt = None, None
    if resume is not None:
        reader = load_run(resume)
        ckpt = reader.load_checkpoint("cpu")  # weights_only: nothing in the file runs
        cfg = resume_config(resume, overrides, None if cfg is None else _coerce_config(cfg), ckpt)
    else:
        if cfg is None:
            raise TypeError("train() needs a config (or resume=RUN_DIR)")
        cfg = _coerce_config(cfg)
        if overrides:
            cfg = from_dict(apply_overrides(to_dict(cfg), overrides), "<config> + --set")
        if dist.is_main:
            preflight.check_out_dir(out_dir)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    show = cfg.train.progress if progress is None else progress
    command = list(command) if command is not None else list(sys.argv)

    with deterministic_mode(cfg.train.deterministic, device):
        seed_everything(cfg.train.seed)
        trainer = _Trainer(cfg, dist, device, verbose, show)
        trainer.build()  # data / model / method errors leave no folder behind
        if reader is not None:
            check_resume_point(reader, ckpt, trainer.sched.steps_per_epoch, trainer.sched.schedule_steps,
                               trainer.sched.run_steps)
            _load_for_resume(trainer, reader, ckpt)
        writer = _open_writer(trainer, cfg, out_dir, reader, ckpt, lock, command, device)
        trainer.t0 = time.perf_counter()
        try:
            with StopSignals(on_request=_announce_stop) as signals:
                trainer.signals = signals
                trainer.attach_writer(writer)
                if ckpt is None:
                    trainer.write_sparsify()
                    trainer.say(f"run {writer.id}: {trainer.sched.run_steps} steps "
                                f"({trainer.sched.steps_per_epoch}/epoch, schedule {trainer.sched.schedule_steps}) "
                                f"on {describe_device(device)} -> {writer.path}")
                else:
                    trainer.say(f"resuming {writer.id} at step {trainer.step} -> {trainer.sched.run_steps}")
                del ckpt
                trainer.train_loop()
                bad = nonfinite_entries(trainer.model.state_dict())
                if bad:
                    raise DivergedError(f"diverged: the weights are not finite at the end (step {trainer.step}; "
                                        f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
            summary = trainer.summary()
            if dist.is_main:
                writer.write_config(cfg)
                writer.complete(summary)
            trainer.say(f"done: {writer.id}: test acc {_num(trainer.last_test['acc'])}, "
                        f"{2 * trainer.global_macs[0]:.4g} ideal training FLOPs, "
                        f"{trainer.wall_time():.1f}s")
            return trainer.result("completed", summary)
        except DivergedError as err:
            summary = trainer.summary("diverged", err.divergence)
            if dist.is_main:
                writer.diverge(f"{err}; lower train.lr (now {cfg.train.lr:g}) or check the data", summary)
                trainer.say(f"run {writer.id} {err} (status 'diverged', no DONE)")
            return trainer.result("diverged", summary)
        except KeyboardInterrupt as err:
            if dist.is_main:
                writer.interrupt(err.name if isinstance(err, StopRequested) else "KeyboardInterrupt")
                trainer.say(_ending_note(writer, "interrupted", trainer.step))
            raise
        except BaseException as err:
            if dist.is_main and trainer.signals is not None and trainer.signals.signum is not None:
                # e.g. the loader's workers got the scheduler's SIGTERM too and died before the step ended
                writer.interrupt(f"{signal.Signals(trainer.signals.signum).name} ({type(err).__name__}: {err})")
                trainer.say(_ending_note(writer, "interrupted", trainer.step))
                raise StopRequested(trainer.signals.signum) from err
            if dist.is_main:
                writer.fail(err, traceback.format_exc())
                trainer.say(_ending_note(writer, "failed", trainer.step))
            raise
        finally:
            writer.close()
            if reader is None:
                writer.release()  # a resume's lock is released by train()
            detach = getattr(trainer.ledger, "detach", None)
            if detach is not None:
                detach()


def _announce_stop(name: str) -> None:
    """What a stop signal does (written straight to stderr: this runs inside the signal handler)."""
    again = " (Ctrl-C again to stop now, without one)" if name == "SIGINT" else ""
    sys.stderr.write(f"\nbame: {name}: stopping after this step, with a checkpoint{again}\n")
