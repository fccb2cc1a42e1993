"""Reading checkpoints without running code: ``torch.load(weights_only=True)`` and clear refusals.

A bame checkpoint holds only tensors, numbers, strings, ``None`` and dicts / lists / tuples of them
(enums as their string values, RNG states as tensors; see ``bame.loop`` and ``bame.seed``), so
``torch.load(path, weights_only=True)`` reads it and nothing else is ever unpickled. Run folders are
shared and downloaded: a crafted ``last.pt`` that asks to call a function is refused with
:class:`UnsafeCheckpointError` naming what it asked for, and the function never runs.

Checkpoints written before RNG states were stored as tensors hold NumPy's RNG key as an ``ndarray``;
the NumPy globals that rebuild a uint32 array (data, not code) are allowed while loading, so those run
folders still resume and export.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint_file"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, damaged (truncated, empty), or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code (or build objects other than data) if it were unpickled."""


def _numpy_array_globals() -> list[Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles the dtype's class too
    uint32 = [dtypes.UInt32DType] if dtypes is not None and hasattr(dtypes, "UInt32DType") else []
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *uint32]


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the file's pickle names that weights_only loading would refuse (read, never run)."""
    import torch

    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_array_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - an unreadable file is reported as damaged by the caller
        return []
    return [g for g in found if g not in allowed]


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that name the file.

    Raises :class:`CheckpointError` for a missing, empty, truncated or otherwise unreadable file and
    :class:`UnsafeCheckpointError` for a file that asks to call a function or build an object of a
    class that is not plain data; neither case executes anything from the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint is damaged (an empty file): it cannot be loaded; "
                              f"resume from a copy, or start the run again")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: refused: the checkpoint asks to load {', '.join(unsafe[:3])}, which is not data "
                f"(bame checkpoints hold only tensors, numbers and strings); it was not loaded, and nothing in "
                f"it ran. Do not use this file unless you know who made it and why") from None
        raise CheckpointError(f"{path}: the checkpoint is damaged ({_first_line(err)}): it cannot be loaded; "
                              f"resume from a copy, or start the run again") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: the checkpoint is damaged or truncated ({type(err).__name__}: "
                              f"{_first_line(err)}): it cannot be loaded; resume from a copy, or start the run "
                              f"again") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
