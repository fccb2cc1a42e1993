"""Checks a run passes before its folder exists, each failing with a one-line error that says the fix.

``bame.train`` (bame.training) builds data, model and method first, then runs these, and only then makes
the run folder: a run that cannot train leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import Config, ConfigError
from .layers import SparsifyReport
from .nm import Layout
from .runfolder import RunFolderError
from .seed import rng_neutral

__all__ = ["check_out_dir", "check_pattern_fits", "check_model_runs", "check_tensorboard"]

_SUGGESTED_M = (2, 4, 8, 16, 32)


def check_out_dir(out_dir: str | Path) -> None:
    """The folder of runs is (or can become) a folder this process can write in; creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a folder; give a folder to hold the run folders "
                             f"(e.g. --out runs)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"--out {out}: {existing} is a file, so no folder can be made under it; give "
                             f"another folder (e.g. --out runs)")
    try:
        probe = tempfile.mkdtemp(prefix=".bame-write-test-", dir=existing)  # the only true test (root, ACLs)
    except OSError as err:
        raise RunFolderError(f"--out {out}: cannot write in {existing} ({err.strerror or err}); give a folder "
                             f"you can write to (e.g. --out runs)") from None
    os.rmdir(probe)


def check_tensorboard(cfg: Config) -> None:
    """``train.tensorboard: true`` needs the tensorboard package (its writer is imported only then)."""
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(["train.tensorboard: true needs the tensorboard package: pip install 'bame[tensorboard]' "
                           "(or set train.tensorboard=false)"])


def _reduction_size(shape: tuple[int, ...], layout: Layout) -> int:
    """The size N:M groups run along: K = Cin/groups x kh x kw (row), or Cin/groups (channel, conv)."""
    if layout is Layout.CHANNEL and len(shape) == 4:
        return shape[1]
    return math.prod(shape[1:])


def check_pattern_fits(report: Optional[SparsifyReport], cfg: Config) -> None:
    """An N:M method whose model got no N:M layer would train a dense model under an N:M label: refuse,
    naming the pattern, the first layers' K and the M that would fit."""
    if report is None or report.sparse_names:
        return
    pattern = cfg.method.pattern
    model = cfg.model.name
    if pattern.is_dense:
        raise ConfigError([f"method.pattern: {pattern} keeps every weight (N = M), so {cfg.method.name} would "
                           f"train a dense model: use N < M (e.g. 2:4 or 1:16), or method.name=dense"])
    layout = Layout.parse(cfg.method.layout)
    tried = [d for d in report.layers if "divisible" in d.reason]
    if not tried:
        raise ConfigError([f"method.pattern: {pattern} fits no layer of {model}: every conv/linear layer is kept "
                           f"dense by the layer policy ({'; '.join(f'{d.name}: {d.reason}' for d in report.layers[:3])}); "
                           f"relax it (method.first_conv_dense / classifier_dense / depthwise_dense) or use "
                           f"method.name=dense"])
    sizes = [(d.name, _reduction_size(d.shape, layout)) for d in tried]
    what = "Cin/groups" if layout is Layout.CHANNEL else "K"
    shown = ", ".join(f"{name} {k}" for name, k in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
    fits = [(m, sum(k % m == 0 for _, k in sizes)) for m in _SUGGESTED_M if m > pattern.n]
    fits = [(m, n) for m, n in fits if n]
    hint = (", ".join(f"M={m} fits {n} of {len(sizes)}" for m, n in fits) if fits
            else f"no M in {list(_SUGGESTED_M)} divides them")
    raise ConfigError([f"method.pattern: {pattern} fits no layer of {model}, so {cfg.method.name} would train a "
                       f"dense model: no {what} is a multiple of M={pattern.m} ({what}: {shown}); {hint}"])


def _size_keys(cfg: Config) -> str:
    if cfg.data.name == "synthetic":
        return "data.synthetic_image_size"
    if cfg.data.name == "imagenet":
        return "data.image_size"
    return "model.name (a model made for these images)"


def check_model_runs(model: nn.Module, input_shape: tuple[int, ...], cfg: Config, device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """One forward pass on a dummy batch of one (eval mode, no grad, no RNG moved, nothing recorded),
    so a model that cannot take the data's images fails here and not at step 0 in a new folder."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), rng_neutral(device), autocast():
            model(torch.zeros((1, *input_shape[1:]), device=device))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shape = "x".join(map(str, input_shape[1:]))
        raise ConfigError([f"model.name: {cfg.model.name} cannot run on the data's {shape} images ({first}); "
                           f"use larger images ({_size_keys(cfg)}) or another model"]) from None
    finally:
        model.train(was_training)
