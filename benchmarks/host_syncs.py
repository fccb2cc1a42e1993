"""Count the host reads of tensor values (each one a device->host sync on a GPU) in one training step.

    python benchmarks/host_syncs.py [--model resnet32] [--batch 16] [--steps 4]

A training step run the loop's way (method hooks, ledger, recorders) on the CPU, with ``Tensor.__int__``,
``__bool__``, ``__float__``, ``item`` and ``tolist`` counted. On the CPU these cost nothing; on a GPU each
one waits for every kernel queued so far, so the CPU cannot run ahead. Steady state = a step after
the first few (nothing new to cache). Columns: ledger and recorders off / ledger on / both on.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import traceback

import torch

from bame.config import BameConfig, Config, DataConfig, InstrumentConfig, MethodConfig, ModelConfig, TrainConfig
from bame.experiment import build
from bame.step import training_step

READS = ("__int__", "__bool__", "__float__", "item", "tolist")


@contextlib.contextmanager
def counting(where: collections.Counter):
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            frames = [f for f in traceback.extract_stack()[:-1] if "/bame/" in f.filename]
            f = frames[-1] if frames else traceback.extract_stack()[-2]
            where[f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {name}"] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def steady_state_reads(model_name: str, method_name: str, batch: int, steps: int, ledger_on: bool,
                       recorders_on: bool) -> list[collections.Counter]:
    """Reads of step ``steps - 4`` (BAME adapts every 4 steps from 0) and of the last step (3 steps later)."""
    torch.manual_seed(0)
    cfg = Config(data=DataConfig(name="synthetic", synthetic_image_size=32, synthetic_channels=3),
                 model=ModelConfig(model_name),
                 method=MethodConfig(name=method_name, pattern="2:4", bame=BameConfig(interval_steps=4, t_f_fraction=1.0)),
                 train=TrainConfig(epochs=0, max_steps=1000, lr=0.01, momentum=0.9, lr_schedule="constant"),
                 instrument=InstrumentConfig(flops=ledger_on, mask_flips=recorders_on,
                                             block_state_every_adaptations=1 if recorders_on else 0))
    exp = build(cfg, steps_per_epoch=100)
    model, method, opt, ledger, rec = exp.model, exp.method, exp.optimizer, exp.ledger, exp.recorders
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counters = [collections.Counter() for _ in range(steps)]
    for step in range(steps):
        with counting(counters[step]):
            training_step(step, model, method, opt, ledger, x, y)
            if recorders_on:
                rec.on_step_end(step)
    return [counters[-4], counters[-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="a multiple of 4 (bame adapts every 4 steps)")
    ap.add_argument("--methods", default="dense,static,srste,ste,bame")
    ap.add_argument("--verbose", action="store_true", help="where the reads happen")
    args = ap.parse_args()
    if args.steps % 4 or args.steps < 8:
        ap.error("--steps must be a multiple of 4, at least 8")
    print(f"host reads of tensor values per step (steady state: step {args.steps - 1}; bame's adaptation "
          f"step: {args.steps - 4}), {args.model} batch {args.batch}")
    print(f"{'method':<12} {'plain':>6} {'+ledger':>8} {'+recorders':>11}")
    for name in args.methods.split(","):
        rows = {name: [], f"{name} adapt": []}
        for ledger_on, rec_on in ((False, False), (True, False), (True, True)):
            adapt, normal = steady_state_reads(args.model, name, args.batch, args.steps, ledger_on, rec_on)
            rows[name].append(normal)
            rows[f"{name} adapt"].append(adapt)
        for label, counters in rows.items():
            if label.endswith("adapt") and name != "bame":
                continue
            print(f"{label:<12} " + " ".join(f"{sum(c.values()):>{w}}" for c, w in zip(counters, (6, 8, 11))))
            if args.verbose:
                for c, what in zip(counters, ("plain", "+ledger", "+recorders")):
                    if c:
                        print(f"    {what}: {dict(c)}")


if __name__ == "__main__":
    main()
