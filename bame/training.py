"""``train(cfg)``: one run's life around the training loop (``bame.loop``).

The config (a YAML path, a dict or a :class:`Config`, with overrides); for a resume, the run folder's lock
first and then the checkpoint's own config (``bame.resume``); the device and the seeds; the data and the
experiment, built and checked before the run folder exists (``bame.preflight``), so a run that cannot
train leaves nothing behind; then the folder (``bame.runs``), the loop, and the run's ending: completed
(``summary.json``, then ``DONE``), diverged, interrupted by a signal (with a checkpoint) or failed; and
the :class:`RunResult` it returns. docs/run_folders.md states what a folder guarantees.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import preflight
from .config import Config, apply_overrides, from_dict, load_config, to_dict
from .contract import COMPLETED, DIVERGED, FAILED, FLOPS_CONVENTION, INTERRUPTED
from .distributed import DistContext
from .divergence import DivergedError, Divergence, nonfinite_entries
from .experiment import dense_step_macs, describe_device, resolve_device
from .loop import Trainer, fmt_metric
from .resume import RESUMABLE_CHANGES, ResumeError, check_resume_point, load_for_resume, reopen_writer, resume_config
from .runlock import RunLock
from .runs import NullWriter, RunReader, RunWriter, config_pattern_label, load_run
from .seed import deterministic_mode, seed_everything
from .signals import StopRequested, StopSignals

__all__ = ["train", "RunResult", "run_summary", "ResumeError", "RESUMABLE_CHANGES"]


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


def _open_writer(trainer: Trainer, cfg: Config, out_dir: str | Path, resume: Optional[RunReader],
                 ckpt: Optional[dict], lock: Optional[RunLock], command: list[str]) -> Any:
    if not trainer.dist.is_main:
        return NullWriter()
    device = describe_device(trainer.device)
    if resume is None:
        return RunWriter.create(out_dir, cfg, command=command, device=device,
                                extra={"world_size": trainer.dist.world_size, "schedule": vars(trainer.sched)})
    return reopen_writer(resume, lock, cfg, ckpt, trainer.sched.run_steps, command=command, device=device)


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
        trainer = Trainer(cfg, dist, device, verbose, show)
        trainer.build()  # data / model / method errors leave no folder behind
        if reader is not None:
            check_resume_point(reader, ckpt, trainer.sched.steps_per_epoch, trainer.sched.schedule_steps,
                               trainer.sched.run_steps)
            load_for_resume(trainer, reader, ckpt)
        writer = _open_writer(trainer, cfg, out_dir, reader, ckpt, lock, command)
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
            summary = run_summary(trainer)
            if dist.is_main:
                writer.write_config(cfg)
                writer.complete(summary)
            trainer.say(f"done: {writer.id}: test acc {fmt_metric(trainer.last_test['acc'])}, "
                        f"{2 * trainer.global_macs[0]:.4g} ideal training FLOPs, "
                        f"{trainer.wall_time():.1f}s")
            return _result(trainer, COMPLETED, summary)
        except DivergedError as err:
            summary = run_summary(trainer, DIVERGED, err.divergence)
            if dist.is_main:
                writer.diverge(f"{err}; lower train.lr (now {cfg.train.lr:g}) or check the data", summary)
                trainer.say(f"run {writer.id} {err} (status 'diverged', no DONE)")
            return _result(trainer, DIVERGED, summary)
        except KeyboardInterrupt as err:
            if dist.is_main:
                writer.interrupt(err.name if isinstance(err, StopRequested) else "KeyboardInterrupt")
                trainer.say(_ending_note(writer, INTERRUPTED, trainer.step))
            raise
        except BaseException as err:
            if dist.is_main and trainer.signals is not None and trainer.signals.signum is not None:
                # e.g. the loader's workers got the scheduler's SIGTERM too and died before the step ended
                writer.interrupt(f"{signal.Signals(trainer.signals.signum).name} ({type(err).__name__}: {err})")
                trainer.say(_ending_note(writer, INTERRUPTED, trainer.step))
                raise StopRequested(trainer.signals.signum) from err
            if dist.is_main:
                writer.fail(err, traceback.format_exc())
                trainer.say(_ending_note(writer, FAILED, trainer.step))
            raise
        finally:
            trainer.writer.close()  # the writer, or the TensorBoard sink around it (train.tensorboard)
            writer.close()
            if reader is None:
                writer.release()  # a resume's lock is released by train()
            trainer.ledger.detach()


def _announce_stop(name: str) -> None:
    """What a stop signal does (written straight to stderr: this runs inside the signal handler)."""
    again = " (Ctrl-C again to stop now, without one)" if name == "SIGINT" else ""
    sys.stderr.write(f"\nbame: {name}: stopping after this step, with a checkpoint{again}\n")


# --------------------------------------------------------------------------------------------------
# the run's record


def run_summary(trainer: Trainer, status: str = COMPLETED, divergence: Optional[Divergence] = None) -> dict[str, Any]:
    """``summary.json``: the final metrics, the FLOPs totals (summed over ranks), the wall time."""
    flops = trainer.run_flops()
    ideal, executed, by_phase = flops.ideal, flops.executed, flops.by_phase
    trainer.global_macs = (ideal, executed)
    dense = (dense_step_macs(trainer.cfg, trainer.bundle.shape, trainer.cfg.train.batch_size * trainer.dist.world_size,
                             trainer.device) * trainer.step if trainer.cfg.instrument.flops else None)
    report = trainer.method.report
    return {
        "run_id": trainer.writer.id,
        "status": status,
        "config_name": trainer.cfg.name,
        "method": trainer.cfg.method.name,
        "pattern": config_pattern_label(trainer.cfg),
        "seed": trainer.cfg.train.seed,
        "steps": trainer.step,
        "epochs": trainer.step / trainer.sched.steps_per_epoch,
        "steps_per_epoch": trainer.sched.steps_per_epoch,
        "schedule_steps": trainer.sched.schedule_steps,
        "final": {"test_acc": trainer.last_test["acc"], "test_loss": trainer.last_test["loss"],
                  "train_loss": trainer.last_train["loss"], "train_acc": trainer.last_train["acc"]},
        "best_test_acc": trainer.best_test_acc,
        "flops": {
            "convention": FLOPS_CONVENTION,
            "enabled": trainer.cfg.instrument.flops,
            "ideal_macs": ideal,
            "executed_macs": executed,
            "ideal_flops": 2 * ideal,
            "executed_flops": 2 * executed,
            "by_phase": {k: {"ideal_macs": int(v[0]), "executed_macs": int(v[1])} for k, v in by_phase.items()},
            # dense training of the same model for the same steps and global batch, and the ratio
            "dense_macs": dense,
            "ideal_x_dense": ideal / dense if dense else None,
            # summed over this many ranks' ledgers; adaptation (replicated per rank): ideal once
            "ranks_summed": trainer.dist.world_size,
        },
        "sparsify": {"sparse_layers": len(report.sparse_names), "dense_layers": len(report.dense_names)}
        if report is not None else None,
        "wall_time_s": round(trainer.wall_time(), 3),
        "device": describe_device(trainer.device),
        "world_size": trainer.dist.world_size,
        **({"diverged": divergence.to_dict()} if divergence is not None else {}),
    }

def _result(trainer: Trainer, status: str, summary: Optional[dict] = None) -> RunResult:
    return RunResult(
        run_dir=trainer.writer.path, run_id=trainer.writer.id, status=status, steps=trainer.step,
        epochs=trainer.step / trainer.sched.steps_per_epoch, test_acc=trainer.last_test["acc"],
        test_loss=trainer.last_test["loss"], best_test_acc=trainer.best_test_acc,
        train_loss=trainer.last_train["loss"], ideal_macs=trainer.global_macs[0],
        executed_macs=trainer.global_macs[1], wall_time_s=trainer.wall_time(),
        summary=summary or {}, model=trainer.model)
