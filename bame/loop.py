"""The one training loop, for every method (it never asks which method it runs).

:class:`Trainer` holds one run: it builds the data and the experiment (``bame.experiment.build``), then
steps in the order of docs/contracts.md (``bame.step.training_step``)::

    method.before_step(step); ledger.begin_step()
    loss = criterion(model(x), y); loss.backward()          # (fp16: scaled, then unscaled here)
    method.after_backward(step)                              # sees unscaled gradients
    ledger.charge_adaptation(method.mask_work_ops())
    optimizer.step(); scheduler.step()
    method.after_optimizer_step(step)
    ledger.end_step(); recorders.on_step_end(step)

and after each step logs, evaluates and checkpoints when due. The run's lengths follow
``bame.schedule.plan_schedule``. Evaluation (top-1 and cross-entropy on the test set, without label
smoothing) runs every ``train.eval_every_epochs`` and at the end, with the FLOPs ledger paused and without
moving any RNG, so it never changes the training trajectory. Checkpoints (``checkpoints/last.pt``) are
written at every epoch end, every ``train.checkpoint_every_steps`` and at the end; a resumed run continues
from the last one and reproduces the uninterrupted run exactly on the same machine (the epoch's shuffled
order is rebuilt from the loader's RNG state at the epoch start and the consumed batches skipped).

``bame.divergence`` stops a run whose loss stays non-finite (status ``diverged``); SIGTERM, SIGUSR1 and
Ctrl-C stop it at the end of a step with a checkpoint (``bame.signals``). Distributed: everything
rank-dependent goes through :class:`bame.distributed.DistContext`; only rank 0 writes. The run's life
around the loop (config, lock, folder, endings) is ``bame.training``.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from . import data, preflight
from .config import Config, ConfigError, dump_yaml, to_dict
from .contract import DENSE_PATTERN, FLOPS_TABLE, METRICS_TABLE, SPARSIFY_TABLE, TENSORBOARD_DIR
from .distributed import DistContext, average_float_buffers, check_masks_agree
from .divergence import DivergedError, DivergenceGuard
from .experiment import build
from .layers import nm_layers
from .flops import RunFlops, StepCost, run_flops, sum_rows_over_ranks
from .resume import ResumeError
from .runs import NullWriter
from .seed import capture_rng, restore_rng, rng_neutral
from .signals import StopRequested, StopSignals
from .step import training_step
from .tensorboard_sink import TensorBoardSink

__all__ = ["Trainer", "CHECKPOINT_FORMAT", "fmt_metric"]

CHECKPOINT_FORMAT = 2  # 2: plain data only (RNG states as tensors): loads with torch.load(weights_only=True)


def fmt_metric(x: Optional[float]) -> str:
    """A loss or an accuracy in a message (``-`` when there is none yet)."""
    return "-" if x is None else f"{x:.4f}"


def _unpack_loaders(loaders: Any) -> tuple[Any, Any]:
    if isinstance(loaders, (tuple, list)):
        return loaders[0], loaders[1]
    return loaders.train, loaders.test


class Trainer:
    """State of one training run: its experiment, data, run folder and counters; ``bame.training.train`` is
    its only user."""

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
        self.last_cost = StepCost(0, 0, {})  # the ledger's account of the last step taken
        self.last_flops: Optional[RunFlops] = None  # the run's counts in the last metrics row
        self.scalars: dict[str, float] = {}
        self.global_macs: tuple[int, int] = (0, 0)  # run totals summed over ranks (set by training.run_summary)
        self.guard = DivergenceGuard(tc.nan_patience, device)
        self.signals: Optional[StopSignals] = None  # set while the loop runs under StopSignals
        self.checkpointed_step: Optional[int] = None  # the step of the last checkpoint written (or loaded)
        self.scale = None  # the fp16 GradScaler's scale before the step (a drop means it skipped the step)
        self.sparsify_due = False  # sparsify.csv waits for the first step's auto kernel choices
        # train.clip_grad_norm: the pre-clip gradient norms of the steps since the last train row, and how many
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_steps = 0

    # -- set-up ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Data and loaders, then the experiment (:func:`bame.experiment.build`), the checks that need it
        (bame.preflight), the fp16 grad scaler, the loss and, under torchrun, the DDP wrapper: everything
        but the run folder."""
        cfg, tc = self.cfg, self.cfg.train
        self.bundle = data.build_datasets(cfg.data)
        try:
            loaders = data.make_loaders(self.bundle, tc.batch_size, tc.eval_batch_size, cfg.data.num_workers,
                                        tc.seed, distributed=self.dist.distributed,
                                        pin_memory=self.device.type == "cuda")
        except ValueError as err:
            raise ConfigError([f"train.batch_size: {err}"]) from None
        self.train_loader, self.test_loader = _unpack_loaders(loaders)
        exp = build(cfg, shape=self.bundle.shape, steps_per_epoch=len(self.train_loader), device=self.device)
        self.sched, self.model, self.method = exp.schedule, exp.model, exp.method
        self.optimizer, self.scheduler = exp.optimizer, exp.scheduler
        self.ledger, self.recorders = exp.ledger, exp.recorders  # the recorders' sink: attach_writer
        preflight.check_pattern_fits(self.method.report, cfg)
        preflight.check_tensorboard(cfg)
        b = self.bundle
        with self.ledger.paused():  # the dummy forward is no training work
            preflight.check_model_runs(self.model, (1, b.in_channels, b.image_size, b.image_size), cfg,
                                       self.device, self.autocast)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
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
        if self.cfg.train.tensorboard and self.dist.is_main:  # events of what goes through the writer
            writer = TensorBoardSink(writer, writer.path / TENSORBOARD_DIR, config_text=dump_yaml(self.cfg),
                                     start_step=self.step, phase_totals=lambda: self.last_flops.by_phase)
        self.writer = writer
        self.recorders.sink = writer

    def write_sparsify(self, now: bool = False) -> None:
        """Write sparsify.csv; while a layer's kernel (``auto``, or a fallback) is still undecided, after the
        first step instead (``now``: the loop's call then), so that its rows say which kernel ran."""
        if not now and any(layer.sparse_kernels.pending for _, layer in nm_layers(self.model)):
            self.sparsify_due = True
            return
        self.sparsify_due = False
        report = self.method.report
        if report is not None:
            rows = report.to_rows(self.model)
        else:
            rows = [dict(name=n, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
                         shape="x".join(map(str, m.weight.shape)), sparse=False,
                         reason=f"method {self.cfg.method.name!r} keeps every layer dense", pattern=DENSE_PATTERN,
                         rule="", forward_kernel="", input_grad_kernel="", weight_grad_kernel="")
                    for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.writer.append_rows(SPARSIFY_TABLE, rows)

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
        flops = self.last_flops = self.run_flops()
        step_ideal, cum_ideal, cum_executed = flops.step_ideal, flops.ideal, flops.executed
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
        self.writer.append_rows(FLOPS_TABLE, sum_rows_over_ranks(rows, self.dist.world_size))

    def run_eval(self) -> None:
        res = self.evaluate()
        self.last_test = res
        if self.best_test_acc is None or res["acc"] > self.best_test_acc:
            self.best_test_acc = res["acc"]
        self.writer.append(METRICS_TABLE, self._row("test", res["loss"], res["acc"]))
        self.say(f"step {self.step}/{self.sched.run_steps} (epoch {self.step / self.sched.steps_per_epoch:.2f}): "
                 f"test acc {res['acc']:.4f} loss {res['loss']:.4f}, train loss {fmt_metric(self.last_train['loss'])}")

    # -- the loop ----------------------------------------------------------------------------------
    def epochs(self) -> Iterator[Iterator]:
        """One batch iterator per epoch from ``self.step`` on; a resume mid-epoch rebuilds the epoch's
        shuffled order from its starting RNG state and skips the batches already consumed."""
        loader, spe = self.train_loader, self.sched.steps_per_epoch
        while self.step < self.sched.run_steps:
            epoch, into = divmod(self.step, spe)
            if hasattr(loader.sampler, "set_epoch"):  # a DistributedSampler
                loader.sampler.set_epoch(epoch)
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
                                            after_update=self._check_masks if tc.check_mask_sync else None,
                                            clip_grad_norm=tc.clip_grad_norm)
                    loss, out, cost = outcome.loss, outcome.output, outcome.cost
                    if outcome.grad_norm is not None:
                        self.grad_norm_sum += outcome.grad_norm.double()
                        self.grad_norm_steps += 1
                    self.guard.observe(step + 1, loss, skipped=self._scaler_skipped())
                    self.last_cost = cost
                    if self.sparsify_due:
                        self.sparsify_due = False
                        self.write_sparsify(now=True)
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
            if self.grad_norm_steps:  # the same on every rank: the gradients were all-reduced before it
                self.scalars["grad_norm"] = float(self.grad_norm_sum) / self.grad_norm_steps
                self.grad_norm_sum.zero_()
                self.grad_norm_steps = 0
            self.writer.append(METRICS_TABLE, self._row("train", self.last_train["loss"], self.last_train["acc"]))
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

    def run_flops(self) -> RunFlops:
        """The ledger's counts for the whole run, summed over ranks (a collective under torchrun)."""
        return run_flops(self.ledger, self.last_cost, self.dist.world_size)
