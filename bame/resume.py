"""What a resume may change, and the checks that keep a resumed run the run it continues.

A checkpoint stores the config it was trained under (``ckpt["config"]``); it, not the folder's
``config.yaml``, is the truth about the weights it holds. A resume therefore checks two things before
it touches the folder:

1. ``config.yaml`` still says what the checkpoint says (a hand edit of the method, the pattern or the
   LR would otherwise continue the run under a config it never had, and label it so);
2. the config of the resume (``config.yaml`` plus ``--set``) differs from the checkpoint's only in
   :data:`RESUMABLE_CHANGES`.

Each refusal lists every differing key as ``key: checkpoint -> now``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .config import Config, ConfigError, apply_overrides, from_dict, to_dict
from .contract import CONFIG
from .runlock import RunLock
from .runs import RunReader, RunWriter

__all__ = ["RESUMABLE_CHANGES", "ResumeError", "resume_config", "config_changes", "check_resume_point",
           "load_for_resume", "reopen_writer"]

# Keys a resume may change: how long the run goes on, how often it logs, evaluates and checkpoints, its
# guards, and whether TensorBoard shows it. None of them changes a trained number (evaluation moves no RNG,
# checkpoints, logs and events only observe), so a resumed run stays the prefix-exact continuation of the
# one it extends.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.progress",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.eval_every_epochs",
    "train.nan_patience",
    "train.check_mask_sync",
    "train.tensorboard",
)


class ResumeError(ValueError):
    """A run folder that cannot be resumed as asked (changed config, nothing left to do, no checkpoint)."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Config, new: Config, allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """``'key: old -> new'`` for every key outside ``allowed`` whose value differs."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in allowed]


def _checkpoint_config(reader: RunReader, ckpt: dict[str, Any]) -> Config:
    stored = ckpt.get("config")
    where = reader.checkpoint_path
    if not isinstance(stored, dict):
        raise ResumeError(f"{where}: the checkpoint does not record the config it was trained under, so a "
                          f"resume cannot check {reader.path / 'config.yaml'} against it; start the run again")
    try:
        return from_dict(stored, f"{where} (its config)")
    except ConfigError as err:
        raise ResumeError(f"{where}: the config stored in the checkpoint no longer loads in this bame "
                          f"({'; '.join(err.errors)})") from None


def resume_config(run_dir: str | Path, overrides: Optional[list[str]] = None, cfg: Optional[Config] = None,
                  ckpt: Optional[dict[str, Any]] = None) -> Config:
    """The config a resume of ``run_dir`` uses: the folder's ``config.yaml`` plus ``overrides`` (or ``cfg``).

    Raises :class:`ResumeError` listing each key that differs, outside :data:`RESUMABLE_CHANGES`,
    between the checkpoint's stored config (``ckpt``, read from the folder when not given) and
    ``config.yaml``, or between it and the config asked for.
    """
    reader = RunReader(run_dir)
    saved = reader.config_dict
    source = str(reader.path / "config.yaml")
    folder_cfg = from_dict(saved, source)
    if cfg is None:
        cfg = from_dict(apply_overrides(saved, overrides), source + " + --set") if overrides else folder_cfg
    elif overrides:
        cfg = from_dict(apply_overrides(to_dict(cfg), overrides), "<config> + --set")
    trained = _checkpoint_config(reader, ckpt if ckpt is not None else reader.load_checkpoint("cpu"))
    edited = config_changes(trained, folder_cfg)
    if edited:
        raise ResumeError(f"{source} differs from the config the checkpoint was trained under "
                          f"({'; '.join(edited)}: checkpoint -> config.yaml); it was edited after the run: "
                          f"put those values back (or start a new run with the new config)")
    changed = config_changes(trained, cfg)
    if changed:
        raise ResumeError(f"{reader.path}: cannot resume with a changed config ({'; '.join(changed)}); only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change")
    return cfg


def check_resume_point(reader: RunReader, ckpt: dict[str, Any], steps_per_epoch: int, schedule_steps: int,
                       run_steps: int) -> None:
    """The data still gives the checkpoint's steps per epoch, and steps are left to train."""
    if ckpt.get("steps_per_epoch") != steps_per_epoch:
        raise ResumeError(f"{reader.path}: the checkpoint has {ckpt.get('steps_per_epoch')} steps per epoch, "
                          f"the data now gives {steps_per_epoch}: the data set on disk changed")
    done_at = int(ckpt["step"])
    if done_at >= schedule_steps:
        raise ResumeError(f"{reader.path}: nothing to do: the checkpoint at step {done_at} ends the whole "
                          f"schedule ({schedule_steps} steps from train.epochs, which a resume cannot change)")
    if done_at >= run_steps:
        raise ResumeError(f"{reader.path}: nothing to do: the checkpoint is at step {done_at} >= "
                          f"train.max_steps ({run_steps}); raise it, up to the schedule's {schedule_steps} "
                          f"steps (e.g. --set train.max_steps={schedule_steps})")


def load_for_resume(trainer: Any, reader: RunReader, ckpt: dict[str, Any]) -> None:
    """Restore ``trainer`` (``bame.loop.Trainer``) from the checkpoint before the folder changes: a checkpoint
    that does not fit the model and method this config builds is refused, the folder untouched."""
    try:
        trainer.load(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        text = " ".join(str(err).split())[:300]
        raise ResumeError(f"{reader.checkpoint_path}: does not fit the model and method of "
                          f"{reader.path / CONFIG} ({type(err).__name__}: {text})") from None


def reopen_writer(reader: RunReader, lock: RunLock, cfg: Config, ckpt: dict[str, Any], to_step: int, *,
                  command: list[str], device: str) -> RunWriter:
    """The folder reopened for the resume (whose ``lock`` the caller holds): its tables cut back to the
    checkpoint's rows, the resume entry written, and (unless it extends a completed run) ``config.yaml``
    with the resume's ``max_steps``."""
    writer = RunWriter.reopen(reader.path, lock, command=command, device=device, from_step=int(ckpt["step"]),
                              to_step=to_step)
    writer.manifest["resumes"][-1]["dropped_rows"] = writer.truncate_tables(ckpt.get("tables", {}))
    writer.manifest["resumes"][-1]["max_steps"] = cfg.train.max_steps
    if not writer.extends_completed:
        writer.write_config(cfg)  # max_steps may have changed (an extension writes it when it completes)
    writer.write_manifest()
    return writer
