"""Stopping a run cleanly on SIGTERM, SIGUSR1 and Ctrl-C (SIGINT).

SLURM and Kubernetes send SIGTERM (SLURM's ``--signal`` often SIGUSR1) some seconds before they kill
a job. While :class:`StopSignals` is active, such a signal only sets a flag; the training loop looks
at it at the end of each step, saves a checkpoint there, marks the run ``interrupted`` and raises
:class:`StopRequested` (a ``KeyboardInterrupt``), which ``bame train`` turns into exit status
``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C). A second Ctrl-C stops at once.

Handlers can only be installed from the main thread; elsewhere (a training thread) the signals keep
their previous handling.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

__all__ = ["StopRequested", "StopSignals", "STOP_SIGNALS"]

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 signal.SIGINT) if s is not None)


class StopRequested(KeyboardInterrupt):
    """The run stopped at the end of a step because of ``signum`` (its checkpoint is saved)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """``128 + signal``, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class StopSignals:
    """Context manager: while active, the stop signals set :attr:`signum` instead of ending the process."""

    def __init__(self, on_request: Optional[Any] = None):
        self.signum: Optional[int] = None
        self._on_request = on_request  # called once with the signal's name (to say what happens next)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.signum is None:
            self.signum = signum
            if self._on_request is not None:
                self._on_request(signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
