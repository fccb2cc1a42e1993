"""The run folder: the append-only writer of ``bame train``, and ``RunReader`` (``bame.runfolder``'s reader
with the typed config and the checkpoint). The names of the files and columns are ``bame.contract``'s.

A run lives in ``OUT/<run id>/`` with ``<run id> = <YYYYmmdd-HHMMSS>-<config name>-<method>-<NofM>-s<seed>``
(no ``<NofM>`` for a dense run; plus ``-2``, ``-3``, ... when that name exists: a folder is never reused).
Its files::

    .lock                held (``fcntl.flock``) by the one process writing the folder (bame.runlock)
    manifest.json        written first; status running | completed | failed | interrupted | diverged, git commit
                         (+ sha256 of ``git diff HEAD`` when dirty), command line, versions, device, seeds,
                         times, the error of a failed run, one entry per resume
    config.yaml          the resolved config, every default filled in (``bame.config.dump_yaml``)
    sparsify.csv         one row per conv/linear layer: sparse or dense, and why
    metrics.csv          train rows (every ``train.log_every_steps`` and at epoch ends) and test rows;
                         ``step`` counts optimizer steps completed, ``epoch`` = step / steps_per_epoch
    flops.csv            exact MACs per layer x phase, one block of rows per epoch end / checkpoint,
                         each covering the work since the previous block (``step`` = steps completed)
    masks.csv, adaptation.csv, blocks/<name>.npz    written by the recorders (bame.instrument)
    summary.json         final metrics, FLOPs totals (MACs; FLOPs = 2 x MACs), wall time
    checkpoints/last.pt  everything a resume needs (see bame.loop)
    DONE                 written last, only by a run that completed

Every json/yaml/checkpoint write is atomic (bame.files: a temporary file ``.<name>.tmp-<pid>``, then ``os.replace``;
the leftovers of a killed writer are removed when the folder is next opened for writing); JSON is strict
(``null`` for a non-finite number). Tables are appended row by row, the header coming from the first
row (a later row with new keys widens the header). A resume truncates each table to the rows it had
when the checkpoint was taken, so rows logged after the checkpoint by a run that then crashed are not
duplicated. docs/run_folders.md states what a folder guarantees.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterable, Mapping

import numpy as np

from .config import Config, dump_yaml, from_dict
from .contract import (BLOCKS_DIR, COMPLETED, CONFIG, DIVERGED, DONE, FAILED, INTERRUPTED, LAYER_RULE_KEYS,
                       MANIFEST, MIXED_PATTERN, RUNNING, STATUSES, SUMMARY, TRANSPOSABLE, is_mixed, run_id)
from .contract import CHECKPOINT as CHECKPOINT_FILE
from .files import (CsvTable, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
                    remove_leftover_temp_files, strict_json)
from .runfolder import RunFolder, RunFolderError, RunNotFoundError
from .runfolder import find_runs as _find_runs
from .runlock import RunLock

__all__ = ["RunWriter", "NullWriter", "RunReader", "load_run", "find_runs", "make_run_id", "config_is_mixed",
           "config_pattern_label", "RunNotFoundError", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
           "git_info", "STATUSES", "RunFolderError", "strict_json", "remove_leftover_temp_files"]

CHECKPOINT = Path(CHECKPOINT_FILE)
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------------------------------
# provenance


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")



def _git(args: list[str], cwd: Path) -> Optional[bytes]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """Commit of the repository holding ``path`` (default: this package) and whether it is dirty.

    ``diff_sha256`` hashes ``git diff HEAD`` (tracked changes); ``untracked`` counts untracked files,
    which the hash cannot see. All ``None`` outside a git checkout.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "untracked": None}
    diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], cwd) or b""
    status = (_git(["status", "--porcelain"], cwd) or b"").decode(errors="replace").splitlines()
    return {
        "commit": commit.decode().strip(),
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        "untracked": sum(1 for line in status if line.startswith("??")),
    }


def _versions() -> dict[str, Optional[str]]:
    from . import __version__

    out: dict[str, Optional[str]] = {"python": platform.python_version(), "bame": __version__}
    for name in ("torch", "torchvision", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            out[name] = None
    return out


def make_run_id(cfg: Config, when: Optional[_dt.datetime] = None) -> str:
    """The run id of ``cfg`` started at ``when`` (now): :func:`bame.contract.run_id`, e.g.
    ``20250101-120000-quick-bame-2of4-s0``; a dense run has no pattern: ``20250101-120000-quick-dense-s0``;
    per-layer patterns: ``...-bame-mixed-s0``; transposable masks: ``...-bame-2of4T-s0``."""
    return run_id(when or _dt.datetime.now(), cfg.name, cfg.method.name, cfg.method.pattern, cfg.train.seed,
                  mixed=config_is_mixed(cfg), transposable=cfg.method.mask_structure == TRANSPOSABLE)


def config_is_mixed(cfg: Config) -> bool:
    """Whether ``cfg`` sets patterns per layer (:func:`bame.contract.is_mixed`)."""
    return is_mixed({key: getattr(cfg.method, key) for key in LAYER_RULE_KEYS})


def config_pattern_label(cfg: Config) -> str:
    """The pattern the manifest and the summary record: ``"1:16"``, or ``"mixed"`` for per-layer patterns
    (sparsify.csv holds each layer's); a dense run records its unused ``method.pattern``."""
    return MIXED_PATTERN if config_is_mixed(cfg) else str(cfg.method.pattern)


# --------------------------------------------------------------------------------------------------
# writer


class RunWriter:
    """Creates and fills one run folder; the sink that recorders write through.

    Use :meth:`create` for a new run and :meth:`reopen` to resume one. The writer holds the folder's
    lock (bame.runlock) until :meth:`release`. Nothing already in the folder is overwritten except the
    files this writer owns (manifest, config after a resume, summary, checkpoint), and those only
    atomically. A resume of a completed run (to a larger ``train.max_steps``) is an *extension*: the
    folder stays ``completed`` with its ``DONE`` and ``summary.json`` until the extension completes;
    an extension that fails, diverges or is interrupted is recorded in its resume entry only.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], lock: Optional[RunLock] = None):
        self.path = Path(path)
        self.manifest = manifest
        self.lock = lock
        self._tables: dict[str, CsvTable] = {}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: str | Path, cfg: Config, *, command: Optional[list[str]] = None,
               device: Optional[str] = None, extra: Optional[dict[str, Any]] = None) -> RunWriter:
        """Make ``out_dir/<run id>/`` (never an existing one), lock it, write ``manifest.json`` then ``config.yaml``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        base = make_run_id(cfg)
        path, counter = out / base, 1
        while True:
            try:
                path.mkdir(exist_ok=False)  # atomic: two processes never get the same folder
                break
            except FileExistsError:
                counter += 1
                path = out / f"{base}-{counter}"
        lock = RunLock.acquire(path)
        manifest = {
            "id": path.name,
            "status": RUNNING,
            "created": _now(),
            "started": _now(),
            "finished": None,
            "command": list(command) if command is not None else list(sys.argv),
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "git": git_info(),
            "versions": _versions(),
            "device": device,
            "seeds": {"train.seed": cfg.train.seed},
            "config_name": cfg.name,
            "method": cfg.method.name,
            "pattern": config_pattern_label(cfg),
            "resumes": [],
            "error": None,
        }
        if extra:
            manifest.update(extra)
        writer = cls(path, manifest, lock)
        writer.write_manifest()
        writer.write_config(cfg)
        return writer

    @classmethod
    def reopen(cls, run_dir: str | Path, lock: RunLock, *, command: Optional[list[str]] = None,
               device: Optional[str] = None, from_step: Optional[int] = None,
               to_step: Optional[int] = None) -> RunWriter:
        """Continue a run folder whose ``lock`` the caller holds: a resume entry (status running), the
        leftovers of a killed writer removed. A failed or interrupted run goes back to ``running``; a
        completed one stays ``completed`` (with ``DONE``) while the extension runs."""
        if lock.run_dir.resolve() != Path(run_dir).resolve() or not lock.held:
            raise ValueError(f"reopen({run_dir}) needs the lock of that folder")
        reader = load_run(run_dir)
        manifest = dict(reader.manifest)
        entry = {"time": _now(), "from_step": from_step, "to_step": to_step,
                 "previous_status": manifest.get("status"), "status": RUNNING,
                 "command": list(command) if command is not None else list(sys.argv), "device": device,
                 "host": socket.gethostname(), "pid": os.getpid(), "git": git_info(),
                 "removed_temp_files": remove_leftover_temp_files(reader.path, (CHECKPOINT.parent.name, BLOCKS_DIR))}
        manifest.setdefault("resumes", []).append(entry)
        writer = cls(reader.path, manifest, lock)
        if not writer.extends_completed:
            manifest.update(status=RUNNING, finished=None, error=None)
            (writer.path / DONE).unlink(missing_ok=True)  # a stale marker: the manifest says not completed
        writer.write_manifest()
        return writer

    @property
    def extends_completed(self) -> bool:
        """Whether this writer resumed a completed run (it then never downgrades the folder's status)."""
        resumes = self.manifest.get("resumes") or []
        return bool(resumes) and resumes[-1].get("previous_status") == COMPLETED

    # -- files -------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.path.name

    def write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.write_manifest()

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / CONFIG, dump_yaml(cfg))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def append(self, table: str, row: Mapping[str, Any]) -> None:
        """Append ``row`` to ``<table>.csv`` (the sink interface of docs/contracts.md)."""
        if not _TABLE_NAME.match(table):
            raise ValueError(f"bad table name {table!r}: use letters, digits, '_', '-', '.'")
        self._table(table).append(row)

    def append_rows(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.append(table, row)

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> None:
        """Save named arrays (numpy or torch) to ``blocks/<name>.npz`` (the sink interface)."""
        if not _TABLE_NAME.match(name):
            raise ValueError(f"bad array file name {name!r}")
        folder = self.path / BLOCKS_DIR
        folder.mkdir(exist_ok=True)
        plain = {}
        for key, value in arrays.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            plain[key] = np.asarray(value)
        buf = io.BytesIO()
        np.savez_compressed(buf, **plain)
        atomic_write_bytes(folder / f"{name}.npz", buf.getvalue())

    def _table(self, name: str) -> CsvTable:
        if name not in self._tables:
            self._tables[name] = CsvTable(self.path / f"{name}.csv")  # reads an existing file's size once
        return self._tables[name]

    def table_rows(self) -> dict[str, int]:
        """Rows per table (``<table>.csv`` in the folder) now, for a checkpoint."""
        return {p.stem: self._table(p.stem).rows for p in self.path.glob("*.csv")}

    def truncate_tables(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Cut every table back to ``counts`` rows (a table not named keeps only its header).

        Returns the number of rows dropped per table (only those with drops).
        """
        dropped = {}
        for p in sorted(self.path.glob("*.csv")):
            n = self._table(p.stem).truncate(int(counts.get(p.stem, 0)))
            if n:
                dropped[p.stem] = n
        return dropped

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        path = self.path / CHECKPOINT
        path.parent.mkdir(exist_ok=True)
        atomic_torch_save(state, path)
        return path

    # -- endings -----------------------------------------------------------------------------------
    def _end_resume(self, status: str, **fields: Any) -> None:
        resumes = self.manifest.get("resumes") or []
        if resumes:
            resumes[-1].update(status=status, finished=_now(), **fields)

    def complete(self, summary: dict[str, Any]) -> None:
        """``summary.json``, status completed, then ``DONE`` (last)."""
        self.close()
        self.write_json(SUMMARY, summary)
        self._end_resume(COMPLETED)
        self.update_manifest(status=COMPLETED, finished=_now(), error=None)
        atomic_write_text(self.path / DONE, self.manifest["finished"] + "\n")

    def _stop(self, status: str, error: str, summary: Optional[dict[str, Any]] = None, **fields: Any) -> None:
        """End without completing; an extension of a completed run records it in its resume entry only."""
        self.close()
        self._end_resume(status, error=error, **fields)
        if self.extends_completed:
            self.write_manifest()
            return
        if summary is not None:
            self.write_json(SUMMARY, summary)
        self.update_manifest(status=status, finished=_now(), error=error, **fields)

    def fail(self, error: BaseException, traceback_text: Optional[str] = None) -> None:
        self._stop(FAILED, f"{type(error).__name__}: {error}", traceback=traceback_text)

    def interrupt(self, reason: str = "KeyboardInterrupt") -> None:
        self._stop(INTERRUPTED, reason)

    def diverge(self, message: str, summary: dict[str, Any]) -> None:
        """Status ``diverged`` (a finished run that failed: no ``DONE``), ``summary.json`` for the record."""
        self._stop(DIVERGED, message, summary)

    def close(self) -> None:
        for t in self._tables.values():
            t.close()

    def release(self) -> None:
        """Give the folder's lock back (the OS does it too when the process ends)."""
        self.close()
        if self.lock is not None:
            self.lock.release()


class NullWriter:
    """The writer of a non-zero rank under torchrun: same interface, writes nothing."""

    path: Optional[Path] = None
    id: Optional[str] = None
    manifest: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


# --------------------------------------------------------------------------------------------------
# reader


class RunReader(RunFolder):
    """A run folder read by bame itself: :class:`bame.runfolder.RunFolder` plus the resolved config as a typed
    :class:`Config` and the checkpoint."""

    @property
    def config(self) -> Config:
        # The file holds a resolved config; its patterns are strings (dump_yaml quotes them).
        return from_dict(self.config_dict, str(self.path / CONFIG))

    def load_checkpoint(self, map_location: Any = "cpu") -> dict[str, Any]:
        """``checkpoints/last.pt`` read with ``torch.load(weights_only=True)`` (bame.checkpoint): a damaged
        or unsafe file raises ``CheckpointError`` naming it; nothing in the file is ever run."""
        from .checkpoint import CheckpointError, load_checkpoint_file

        if self.checkpoint_path is None:
            raise RunNotFoundError(f"{self.path}: no checkpoint ({CHECKPOINT}) to resume from")
        ckpt = load_checkpoint_file(self.checkpoint_path, map_location)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
            raise CheckpointError(f"{self.checkpoint_path}: not a bame checkpoint (expected a dict with 'model' "
                                  f"and 'step', docs/contracts.md)")
        return ckpt

    def __repr__(self) -> str:
        return f"RunReader({str(self.path)!r}, status={self.status!r})"


def load_run(path: str | Path) -> RunReader:
    """Open a run folder for reading; :class:`RunNotFoundError` if ``path`` is not one."""
    return RunReader(path)


def find_runs(out_dir: str | Path) -> list[RunReader]:
    """Every run folder directly under ``out_dir``, sorted by id (oldest first)."""
    return _find_runs(out_dir, RunReader)
