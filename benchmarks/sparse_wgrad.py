"""Does computing the weight gradient only where it is needed (GATHER) beat a masked dense kernel?

    python benchmarks/sparse_wgrad.py [--device cpu|cuda] [--quick] [--out results.json]

Part 1, per layer shape (every distinct N:M conv of CIFAR ResNet-32 at batch 128 and of torchvision
ResNet-50 at 224, batch 8 on a CPU; plus ResNet-50's 2048->1000 linear as a linear shape), patterns
2:4, 1:4, 1:16, a normal step's needed positions (``P = mask``):

- ``masked_dense``: ``conv2d_weight`` (or ``go^T @ x`` for a linear), then ``* needed`` (what
  ``WeightGradKernel.MASKED_DENSE`` runs: dense work);
- ``gather``: ``WeightGradKernel.GATHER``: an SDDMM (``torch.sparse.sampled_addmm``) over the needed
  positions only, after an im2col ``unfold`` for k x k convs (1x1 convs and linears need none); its
  index plan is cached per mask version, as in training.

Both run on the same tensors, interleaved (round-robin, median). ``speedup`` = masked_dense / gather.

Part 2, whole training steps: ``srste`` (dense weight gradient) and ``bame`` outside adaptation with each
kernel (``masked_dense``, ``gather``, ``auto``: per layer shape the faster of the two, timed once at the
first backward), interleaved as in ``step_time.py``: CIFAR ResNet-32 (batch 128) at 2:4 and 1:16,
ResNet-50 (batch 8 at 224 on a CPU) at 1:16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, interleaved, machine, median, paired_ratio, round_robin_times, write_json  # noqa: E402

from bame import models  # noqa: E402
from bame.kernels import (GatherPlan, auto_kernel_choices, gather_conv_weight_grad,  # noqa: E402
                          gather_linear_weight_grad)
from bame.layers import LayerPolicy, sparsify  # noqa: E402
from bame.nm import NMPattern, nm_mask  # noqa: E402

PATTERNS = ["2:4", "1:4", "1:16"]


def layer_shapes(model_name: str, batch: int, image: int, classes: int) -> list[dict]:
    """Distinct N:M-eligible conv/linear calls of the model (default layer policy): weight shape,
    stride, padding and input shape, with how many layers share them."""
    model = models.create(model_name, num_classes=classes, in_channels=3)
    report = sparsify(model, "1:16", policy=LayerPolicy())  # the layers an N:M run makes sparse
    sparse = set(report.sparse_names)
    seen: dict[tuple, dict] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name in sparse:
            def hook(m, inputs, out, _name=name):
                x = inputs[0]
                if isinstance(m, nn.Conv2d):
                    key = ("conv", tuple(m.weight.shape), m.stride, m.padding, tuple(x.shape))
                else:
                    key = ("linear", tuple(m.weight.shape), None, None, tuple(x.shape))
                e = seen.setdefault(key, dict(kind=key[0], weight=list(key[1]), stride=key[2], padding=key[3],
                                              input=list(key[4]), layers=[]))
                e["layers"].append(_name)
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image, image))
    for h in hooks:
        h.remove()
    out = list(seen.values())
    for e in out:
        e["input"][0] = batch
    linear = dict(kind="linear", weight=[1000, 2048], stride=None, padding=None, input=[batch, 2048],
                  layers=["(resnet50 fc shape, dense by policy)"])
    if model_name == "resnet50":
        out.append(linear)
    return out


def bench_layer(e: dict, pattern: str, device, reps: int) -> dict:
    nm = NMPattern.parse(pattern)
    n, m = nm.n, nm.m
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(e["weight"], generator=gen).to(device)
    x = torch.randn(e["input"], generator=gen).to(device)
    mask = nm_mask(w.abs().reshape(w.shape[0], -1), n, m).reshape(w.shape)
    if e["kind"] == "conv":
        stride, padding = tuple(e["stride"]), tuple(e["padding"])
        go = torch.randn(F.conv2d(x, w, None, stride, padding).shape, generator=gen).to(device)
        args = (stride, padding, (1, 1), 1)
        plan = GatherPlan.build(mask.reshape(w.shape[0], -1))
        fns = {
            "masked_dense": lambda: conv2d_weight(x, w.shape, go, stride, padding, 1, 1) * mask,
            "gather": lambda: gather_conv_weight_grad(x, go, plan, w.shape, args),
        }
        positions = go.shape[0] * go.shape[2] * go.shape[3]
    else:
        go = torch.randn(x.shape[0], w.shape[0], generator=gen).to(device)
        plan = GatherPlan.build(mask)
        fns = {"masked_dense": lambda: (go.t() @ x) * mask,
               "gather": lambda: gather_linear_weight_grad(x, go, plan)}
        positions = x.shape[0]
    ref, got = fns["masked_dense"](), fns["gather"]()
    err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30))
    t = {k: median(v) for k, v in round_robin_times(fns, reps, device).items()}
    dense_macs = w.numel() * positions
    return {"pattern": pattern, "masked_dense_ms": t["masked_dense"] * 1e3, "gather_ms": t["gather"] * 1e3,
            "speedup": t["masked_dense"] / t["gather"], "ideal_fraction": n / m,
            "masked_dense_gmacs_per_s": dense_macs / t["masked_dense"] / 1e9,
            "gather_ideal_gmacs_per_s": dense_macs * n / m / t["gather"] / 1e9, "max_rel_diff": err}


def _shape_str(e: dict) -> str:
    w = "x".join(map(str, e["weight"]))
    if e["kind"] == "linear":
        return f"linear {w} in {'x'.join(map(str, e['input']))}"
    return f"conv {w} s{e['stride'][0]} p{e['padding'][0]} in {'x'.join(map(str, e['input']))}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches, fewer shapes")
    ap.add_argument("--reps", type=int, default=0, help="timed repeats per kernel (default 7, --quick 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default 1 on the CPU)")
    ap.add_argument("--skip-steps", action="store_true", help="only part 1 (per layer)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    threads = args.threads or (1 if dev.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    reps = args.reps or (3 if args.quick else 7)
    cuda = dev.type == "cuda"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(),
           "device": args.device, "reps": reps, "layers": [], "steps": {}}
    log(f"machine: {out['machine']}")
    specs = [("resnet32", (32 if args.quick else 128) if not cuda else 128, 32, 10),
             ("resnet50", (2 if args.quick else 8) if not cuda else 64, 224, 1000)]
    log("\nweight gradient of one layer at a normal step (needed = mask), median ms; speedup = masked_dense / gather")
    log(f"{'model':<9} {'shape':<44} {'n':>2} " + " ".join(f"{p:>22}" for p in PATTERNS))
    for model_name, batch, image, classes in specs:
        shapes = layer_shapes(model_name, batch, image, classes)
        if args.quick:
            shapes = shapes[:3] + shapes[-2:]
        for e in shapes:
            rows = [bench_layer(e, p, dev, reps) for p in PATTERNS]
            out["layers"].append({"model": model_name, **e, "count": len(e["layers"]), "results": rows})
            cells = " ".join(f"{r['masked_dense_ms']:7.1f}/{r['gather_ms']:7.1f} {r['speedup']:4.2f}x" for r in rows)
            log(f"{model_name:<9} {_shape_str(e):<44} {len(e['layers']):>2} {cells}")
    # summary: in which shapes does gather win?
    wins = [(lay["model"], _shape_str(lay), r["pattern"], r["speedup"]) for lay in out["layers"]
            for r in lay["results"] if r["speedup"] > 1.0]
    log(f"\nGATHER faster than masked dense in {len(wins)} of {sum(len(lay['results']) for lay in out['layers'])} "
        f"(shape, pattern) cases" + (":" if wins else ""))
    for w in wins:
        log(f"  {w[0]:<9} {w[1]:<44} {w[2]:>5} {w[3]:.2f}x")
    out["gather_wins"] = [dict(model=a, shape=b, pattern=c, speedup=d) for a, b, c, d in wins]

    if not args.skip_steps:
        cases = [("resnet32", 32, 10, (32 if args.quick else 128) if not cuda else 128, "2:4"),
                 ("resnet32", 32, 10, (32 if args.quick else 128) if not cuda else 128, "1:16"),
                 ("resnet50", 224, 1000, (2 if args.quick else 8) if not cuda else 64, "1:16")]
        for model_name, image, classes, batch, pattern in cases:
            log(f"\n{model_name} training step, batch {batch}, {pattern}, ledger + recorders on:")
            variants = [Variant(label, model_name, kind, pattern, batch, image, classes, dev,
                                weight_grad_kernel=kernel).build()
                        for label, kind, kernel in (("srste", "srste", "masked_dense"),
                                                    ("bame_masked_dense", "bame", "masked_dense"),
                                                    ("bame_gather", "bame", "gather"),
                                                    ("bame_auto", "bame", "auto"))]
            before = len(auto_kernel_choices())
            interleaved(variants, reps, 1, warmup=2, log=log)
            choices = auto_kernel_choices()[before:]
            med = {v.label: median(v.times) for v in variants}
            by = {v.label: v for v in variants}
            for k in med:
                r = paired_ratio(by[k].times, by["bame_masked_dense"].times)
                log(f"  {k:<18} {med[k] * 1e3:8.1f} ms  {med[k] / med['srste']:.3f}x srste (medians)  "
                    f"{r['median']:.3f}x bame_masked_dense (paired) [{r['q1']:.3f}, {r['q3']:.3f}]")
            n_gather = sum(c.gather for c in choices)
            log(f"  auto chose gather for {n_gather} of {len(choices)} (shape, density) keys")
            out["steps"][f"{model_name} {pattern}"] = {
                "batch": batch, "median_s": med, "all_s": {v.label: v.times for v in variants},
                "x_bame_masked_dense": {k: paired_ratio(by[k].times, by["bame_masked_dense"].times)
                                        for k in med},
                "auto_choices": [dict(key=[str(k) for k in c.key], gather=c.gather, gather_ms=c.gather_s * 1e3,
                                      masked_dense_ms=c.masked_dense_s * 1e3) for c in choices]}
    if args.out:
        write_json(args.out, out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
