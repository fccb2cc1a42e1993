"""Shared pieces of the benchmarks: a training step built the loop's way, timing, machine facts.

Not part of the package or the test run. A :class:`Variant` is one experiment (``bame.experiment.build``:
model + method + optimizer + FLOPs ledger + recorders, as the training loop builds them) whose ``step()``
runs one optimizer step of the training loop (``bame.step.training_step``, then the recorders) on a fixed
batch, so that only compute is timed (no data loading).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch

from bame.config import BameConfig, Config, DataConfig, InstrumentConfig, MethodConfig, ModelConfig, TrainConfig
from bame.experiment import build
from bame.step import training_step

NEVER = 10 ** 9  # a step no benchmark reaches


class FileSink:
    """Writes recorder rows and arrays to a temporary folder, as a run folder would (so their cost counts)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bame-bench-"))
        self._files: dict[str, Any] = {}

    def append(self, table: str, row: dict) -> None:
        f = self._files.get(table)
        if f is None:
            f = self._files[table] = open(self.dir / f"{table}.jsonl", "a")  # noqa: SIM115
        f.write(json.dumps(row) + "\n")
        f.flush()

    def save_arrays(self, name: str, arrays: dict) -> None:
        np.savez(self.dir / f"{name}.npz", **arrays)


def method_config(kind: str, pattern: str, weight_grad_kernel: str = "masked_dense", **kernels) -> MethodConfig:
    """``kind``: a registered method name, or ``bame_adapt`` (BAME adapting on every step, every block a
    candidate: no freezing) or ``bame`` (BAME outside its adaptation window: a normal step). ``kernels``:
    ``forward_kernel``, ``input_grad_kernel``, ``compile_kernels`` of the method config."""
    if kind == "bame_adapt":
        b = BameConfig(t_i_steps=0, t_f_steps=NEVER, interval_steps=1, obf=False)
        return MethodConfig(name="bame", pattern=pattern, weight_grad_kernel=weight_grad_kernel, bame=b, **kernels)
    if kind == "bame":
        b = BameConfig(t_i_steps=NEVER, t_f_steps=NEVER + 1)
        return MethodConfig(name="bame", pattern=pattern, weight_grad_kernel=weight_grad_kernel, bame=b, **kernels)
    return MethodConfig(name=kind, pattern=pattern, weight_grad_kernel=weight_grad_kernel, **kernels)


@dataclass
class Variant:
    """One model trained by one method, stepping on a fixed batch."""

    label: str
    model_name: str
    method_kind: str
    pattern: str
    batch: int
    image: int
    num_classes: int
    device: torch.device
    instrument: bool = True
    weight_grad_kernel: str = "masked_dense"
    forward_kernel: str = "masked_dense"
    input_grad_kernel: str = "masked_dense"
    compile_kernels: bool = False
    amp: Optional[torch.dtype] = None
    channels_last: bool = False
    seed: int = 0
    times: list[float] = field(default_factory=list)

    def config(self) -> Config:
        """The variant as a config: synthetic images of its shape, SGD at a constant LR, a schedule that never
        ends (BAME's windows as ``method_config`` sets them)."""
        data = DataConfig(name="synthetic", synthetic_num_classes=self.num_classes, synthetic_image_size=self.image,
                          synthetic_channels=3)
        train = TrainConfig(epochs=0, max_steps=NEVER, lr=0.01, momentum=0.9, weight_decay=5e-4,
                            lr_schedule="constant", channels_last=self.channels_last, seed=self.seed)
        instrument = InstrumentConfig(flops=self.instrument, mask_flips=self.instrument,
                                      block_state_every_adaptations=1 if self.instrument else 0)
        return Config(data=data, model=ModelConfig(self.model_name),
                      method=method_config(self.method_kind, self.pattern, self.weight_grad_kernel,
                                           forward_kernel=self.forward_kernel, input_grad_kernel=self.input_grad_kernel,
                                           compile_kernels=self.compile_kernels), train=train,
                      instrument=instrument)

    def build(self) -> Variant:
        torch.manual_seed(self.seed)
        self.sink = FileSink()
        exp = build(self.config(), steps_per_epoch=1000, device=self.device, sink=self.sink)
        self.model, self.method, self.opt = exp.model.train(), exp.method, exp.optimizer
        self.ledger, self.recorders = exp.ledger, exp.recorders
        gen = torch.Generator().manual_seed(self.seed)
        self.x = torch.randn(self.batch, 3, self.image, self.image, generator=gen).to(self.device)
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, self.num_classes, (self.batch,), generator=gen).to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp is torch.float16 else None
        self.t = 0
        return self

    def step(self) -> None:
        amp = self.amp
        training_step(self.t, self.model, self.method, self.opt, self.ledger, self.x, self.y,
                      autocast=(lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext,
                      scaler=self.scaler)
        self.recorders.on_step_end(self.t)
        self.t += 1

    def timed_steps(self, n: int) -> float:
        """Seconds per step over ``n`` steps (device synchronised before and after)."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t0) / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: list[Variant], rounds: int, steps_per_round: int, warmup: int,
                log: Callable[[str], None] = print) -> None:
    """Warm every variant up, then ``rounds`` times run each for ``steps_per_round`` steps, round-robin
    (the order rotates every round), appending each measurement to ``variant.times``."""
    for v in variants:
        for _ in range(warmup):
            v.step()
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v.times.append(v.timed_steps(steps_per_round))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v.label} {v.times[-1] * 1e3:.0f}ms" for v in variants))


def round_robin_times(fns: dict[str, Callable[[], Any]], reps: int,
                      device: torch.device | None = None) -> dict[str, list[float]]:
    """Each function once untimed, then ``reps`` rounds round-robin, the order rotating each round (so drift
    and cache effects fall on every function alike); seconds per call, synchronised with ``device``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if device is not None:
                sync(device)
            t0 = time.perf_counter()
            fns[k]()
            if device is not None:
                sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and quartiles over rounds of ``a[i] / b[i]`` (measured back to back in round ``i``)."""
    r = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}


def write_json(path: str, results: dict[str, Any], log: Any = print) -> None:
    """Write a benchmark's results (creating folders; strict JSON: null for a non-finite number) and say where."""
    from bame.runs import strict_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(strict_json(results))
    log(f"\nwrote {path}")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        info["load_average_1_5_15min"] = list(os.getloadavg())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
