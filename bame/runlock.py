"""One writer per run folder: an OS file lock on ``RUN/.lock``.

A process that writes a run folder (a new run, a resume) holds an exclusive ``fcntl.flock`` on the
folder's lock file for as long as it writes; a second process that tries gets :class:`RunLockedError`
at once, naming the holder's pid (the holder writes ``<pid> <host>`` into the lock file). The OS
releases the lock when the holder exits, however it ends (``kill -9`` included), so a dead process
never blocks a resume, and a pid that the OS has since reused for another program does not either:
only the lock counts, never the pid recorded in ``manifest.json``.

Readers (``bame inspect``) ask :func:`lock_holder` whether a live process holds the lock; they take a
shared lock for a moment, never the exclusive one, and a writer retries for up to a second, so an
``inspect`` at the wrong instant does not make a resume fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .contract import LOCK

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "lock_holder"]

LOCK_FILE = LOCK
_ACQUIRE_WAIT_S = 1.0  # how long a writer retries (a reader's shared probe lasts microseconds)
_RETRY_EVERY_S = 0.02


class RunLockedError(ValueError):
    """Another live process holds the run folder's lock."""


def _holder_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _describe_holder(text: str) -> str:
    """``process 1234`` (``on host x`` when the holder runs elsewhere) from the lock file's ``<pid> <host>``."""
    parts = text.split()
    if not parts:
        return "another process"
    where = f" on host {parts[1]}" if len(parts) > 1 and parts[1] != socket.gethostname() else ""
    return f"process {parts[0]}{where}"


class RunLock:
    """An exclusive lock on one run folder, held from :meth:`acquire` until :meth:`release` (or exit)."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir = run_dir
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(cls, run_dir: str | Path, wait_s: float = _ACQUIRE_WAIT_S) -> RunLock:
        """Lock ``run_dir`` (which must exist) or raise :class:`RunLockedError` naming the holder."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunLockedError(f"{run_dir}: cannot write its lock file {path.name} ({err.strerror or err}): "
                                 f"a run folder is written only where it can be written") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = _describe_holder(_holder_text(path))
                    raise RunLockedError(
                        f"{run_dir}: {holder} is writing this run folder (it holds {path.name}); one process "
                        f"at a time: wait for it to finish, or stop it (it can be resumed after)") from None
                time.sleep(_RETRY_EVERY_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return cls(run_dir, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock back (closing the descriptor releases it); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:  # a lock nobody references any more is released, not leaked
        with contextlib.suppress(Exception):  # at interpreter exit the OS releases it anyway
            self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> Optional[str]:
    """``'process N'`` when a live process holds ``run_dir``'s lock, else None (no lock file, or nobody)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(_holder_text(path))
    finally:
        os.close(fd)  # also drops the shared lock when it was granted
    return None
