"""Seeds, determinism switches and RNG snapshots (for exact resume).

A run seeds Python's ``random``, NumPy and torch (CPU and every CUDA device) from ``train.seed``.
:func:`capture_rng` / :func:`restore_rng` snapshot every generator a training step can draw from,
including the data loader's own ``torch.Generator`` (shuffling, worker base seeds), so a resumed run
draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Optional
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["seed_everything", "deterministic_mode", "capture_rng", "restore_rng", "loader_generators",
           "rng_neutral"]

# cuBLAS needs a fixed workspace to be deterministic (see the CUDA docs on reproducibility).
CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: Optional[torch.device] = None) -> Iterator[None]:
    """Deterministic kernels where cheap: cuDNN flags, and on CUDA ``use_deterministic_algorithms``
    (warn-only: an op without a deterministic kernel warns instead of stopping the run).

    The CPU kernels this package uses are deterministic already, and ``use_deterministic_algorithms``
    imports torch's compiler stack (seconds), so a CPU run leaves it alone. The previous global
    settings come back on exit, so a notebook that trains once keeps its own.
    """
    if not enabled:
        yield
        return
    prev = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[0], prev[1]
        if on_cuda:
            torch.use_deterministic_algorithms(prev[2], warn_only=prev[3])


def loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects a data loader draws from (loader and sampler), by role."""
    gens: dict[str, torch.Generator] = {}
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["loader"] = gen
    sampler = getattr(loader, "sampler", None)
    sgen = getattr(sampler, "generator", None)
    if isinstance(sgen, torch.Generator) and sgen is not gen:
        gens["sampler"] = sgen
    return gens


def _numpy_state() -> dict[str, Any]:
    """NumPy's global RNG state as plain data (its uint32 key as an int64 tensor), so that a checkpoint
    holding it loads with ``torch.load(weights_only=True)``."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: Any) -> None:
    if isinstance(state, dict):
        key = state["key"].numpy() if torch.is_tensor(state["key"]) else np.asarray(state["key"])
        state = (state["bit_generator"], key.astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)  # or the tuple of np.random.get_state() (checkpoints of older versions)


def capture_rng(loader: Any = None) -> dict[str, Any]:
    """A snapshot of every RNG state: python, numpy, torch CPU, CUDA (if initialised), the loader's.

    Plain data only (tuples, numbers, strings, tensors): it travels in checkpoints read with
    ``torch.load(weights_only=True)``."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "loader": {},
    }
    if loader is not None:
        state["loader"] = {role: g.get_state() for role, g in loader_generators(loader).items()}
    return state


def restore_rng(state: dict[str, Any], loader: Any = None) -> None:
    """Put back a :func:`capture_rng` snapshot (the loader's generators too when ``loader`` is given)."""
    random.setstate(tuple(state["python"]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        gens = loader_generators(loader)
        for role, gstate in state.get("loader", {}).items():
            if role in gens:
                gens[role].set_state(gstate)


@contextlib.contextmanager
def rng_neutral(device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block (evaluation) without moving any global RNG: its draws are forgotten on exit.

    Evaluation then never changes the training trajectory, wherever it happens (a run stopped by
    ``max_steps`` mid-epoch evaluates; the uninterrupted run does not at that step).
    """
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
