"""Can sparse forward / input-gradient kernels make N:M training steps faster than dense ones?

    OMP_NUM_THREADS=2 python benchmarks/nm_kernels.py [--threads 2] [--quick] [--out results.json]

Part 1, per layer shape (every distinct N:M conv of CIFAR ResNet-32 at batch 128 and of torchvision
ResNet-50 at 224, batch 8; ResNet-50's 2048->1000 linear as a linear shape) and pattern (2:4, 1:8,
1:16, magnitude masks), all on the same tensors, interleaved round-robin in one process:

- forward ``Y = op(X, W*m)``: ``masked_dense`` (``W*m`` then ``F.conv2d`` / ``F.linear``: what the layers
  run today) and each :class:`bame.nm_kernels.SparseKernel` (``csr``, ``bsr``, ``gather``, ``compiled``),
  the re-pack of ``A = W*m`` from the weight included;
- input gradient ``dX``: ``conv2d_input`` / ``dY @ (W*m)`` vs each kernel (re-pack of ``A^T`` included);
- weight gradient: ``masked_dense`` vs ``gather`` (the SDDMM of ``WeightGradKernel.GATHER``), and that
  SDDMM fed the forward's ``[K, B*L]`` conv columns (what sharing the im2col of ``csr`` would leave);
- the pieces: im2col ``[K, B*L]`` and ``[B, K, L]``, ``fold`` (col2im), re-pack of CSR / ELL values
  (both operands), re-building the CSR tensors from ``W*m`` (``to_sparse_csr``), building the index.

Ratios are medians over rounds of the per-round ratio kernel / masked_dense.

Part 2, whole training steps (``bame.step.training_step`` on a fixed batch, ledger and recorders off):
``dense`` and BAME outside adaptation with ``weight_grad_kernel`` ``masked_dense`` and ``auto``, per
pattern, interleaved; then the **estimate**: per layer shape the fastest forward, input-gradient and
weight-gradient kernel (what a per-shape ``auto`` would pick from the part-1 timings, with the SDDMM on
shared columns where the forward made them), and ``bame masked_dense / dense - sum over layers of
(in-model time of the phase) x (1 - kernel / masked_dense)`` / dense step. The in-model times come from
one profiled dense step (``aten::conv2d`` and ``aten::convolution_backward`` per input and weight shape;
the backward split into input and weight gradient as the isolated masked-dense timings split it):
isolated layer timings add up to more than a whole step (caches, the interleaved slow kernels), so
only their ratios are used. The same arithmetic for the weight gradient alone predicts the measured
``bame auto`` step, a check of the estimate. ``--layers-from`` re-uses part 1 of an earlier output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, interleaved, machine, median, paired_ratio, round_robin_times, write_json  # noqa: E402
from sparse_wgrad import _shape_str, layer_shapes  # noqa: E402

from bame.kernels import GatherPlan, gather_conv_weight_grad, gather_linear_weight_grad, sddmm  # noqa: E402
from bame.nm import nm_mask  # noqa: E402
from bame.nm_compressed import NMIndex  # noqa: E402
from bame.nm_kernels import (SparseKernel, _fold, conv_columns, pack, sparse_conv2d,  # noqa: E402
                             sparse_conv2d_input_grad, sparse_linear, sparse_linear_input_grad)

PATTERNS = ["2:4", "1:8", "1:16"]
KERNELS = [k.value for k in SparseKernel]
DEFAULT_KERNELS = "csr,bsr,compiled,direct"  # gather (eager) is 5-200x dense: measured with --quick only
SHARED = "gather_shared_cols"  # the weight-gradient SDDMM on the forward's [K, B*L] columns


def layer_case(e: dict, pattern: str, kernels: list[str]) -> dict[str, callable]:
    """The functions to time for one layer shape and pattern, named ``phase/kernel`` or ``piece/name``."""
    n, m = (int(v) for v in pattern.split(":"))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(e["weight"], generator=gen)
    x = torch.randn(e["input"], generator=gen)
    mask = nm_mask(w.abs(), n, m)
    index = NMIndex(mask, pattern)
    w_eff = w * mask
    plan = GatherPlan.build(mask.reshape(w.shape[0], -1))
    ks = [SparseKernel(k) for k in kernels]
    fns: dict[str, callable] = {}
    if e["kind"] == "conv":
        args = (tuple(e["stride"]), tuple(e["padding"]), (1, 1), 1)
        stride, padding = args[0], args[1]
        dy = torch.randn(F.conv2d(x, w, None, stride, padding).shape, generator=gen)
        khw = tuple(e["weight"][2:])
        fns["forward/masked_dense"] = lambda: F.conv2d(x, w * mask, None, stride, padding)
        fns["input_grad/masked_dense"] = lambda: conv2d_input(x.shape, w_eff, dy, stride, padding)
        for k in ks:
            fns[f"forward/{k.value}"] = lambda k=k: sparse_conv2d(x, pack(index, w, k), k, w.shape, args)
            fns[f"input_grad/{k.value}"] = lambda k=k: sparse_conv2d_input_grad(
                dy, pack(index, w, k, transpose=True), k, x.shape, w.shape, args)
        fns["weight_grad/masked_dense"] = lambda: conv2d_weight(x, w.shape, dy, stride, padding) * mask
        fns["weight_grad/gather"] = lambda: gather_conv_weight_grad(x, dy, plan, w.shape, args)
        cols_t = conv_columns(x, khw, args, batch_major=False)
        fns[f"weight_grad/{SHARED}"] = lambda: sddmm(dy.transpose(0, 1).reshape(w.shape[0], -1), cols_t, plan)
        cols_b = conv_columns(x, khw, args, batch_major=True)
        fns["piece/im2col_K_BL"] = lambda: conv_columns(x, khw, args, batch_major=False)
        fns["piece/unfold_B_K_L"] = lambda: conv_columns(x, khw, args, batch_major=True).contiguous()
        fns["piece/fold"] = lambda: _fold(cols_b, x.shape, khw, args)
    else:
        dy = torch.randn(x.shape[0], w.shape[0], generator=gen)
        fns["forward/masked_dense"] = lambda: F.linear(x, w * mask)
        fns["input_grad/masked_dense"] = lambda: dy @ w_eff
        for k in ks:
            fns[f"forward/{k.value}"] = lambda k=k: sparse_linear(x, pack(index, w, k), k)
            fns[f"input_grad/{k.value}"] = lambda k=k: sparse_linear_input_grad(dy, pack(index, w, k, True), k)
        fns["weight_grad/masked_dense"] = lambda: (dy.t() @ x) * mask
        fns["weight_grad/gather"] = lambda: gather_linear_weight_grad(x, dy, plan)
    fns["piece/repack_csr"] = lambda: (index.csr.pack(w), index.csr_t.pack(w))
    fns["piece/repack_ell"] = lambda: (index.ell.pack(w), index.ell_t.pack(w))
    fns["piece/rebuild_csr"] = lambda: ((w * mask).reshape(w.shape[0], -1).to_sparse_csr(),
                                        (w * mask).reshape(w.shape[0], -1).t().to_sparse_csr())
    fns["piece/build_index_csr"] = lambda: (lambda i: (i.csr, i.csr_t))(NMIndex(mask, pattern))
    fns["piece/build_index_ell"] = lambda: (lambda i: (i.ell, i.ell_t))(NMIndex(mask, pattern))
    fns["_padding"] = {"ell_t": index.ell_t.padding, "conv_t": index.conv_t.padding}
    return fns


def bench_layer(e: dict, pattern: str, kernels: list[str], reps: int) -> dict:
    fns = layer_case(e, pattern, kernels)
    padding = fns.pop("_padding")
    times = round_robin_times(fns, reps)
    res = {"pattern": pattern, "padding": padding, "ms": {k: median(v) * 1e3 for k, v in times.items()},
           "x_masked_dense": {}}
    for name, t in times.items():
        phase = name.split("/")[0]
        if phase != "piece":
            res["x_masked_dense"][name] = paired_ratio(t, times[f"{phase}/masked_dense"])["median"]
    res["choice"] = choose(res["ms"])
    return res


def choose(ms: dict[str, float]) -> dict:
    """What a per-shape ``auto`` would run: the fastest forward, input gradient and weight gradient, the
    SDDMM on shared columns counted only when the chosen forward (csr/bsr) made them."""
    def best(phase: str, allowed=None) -> tuple[str, float]:
        opts = {k.split("/")[1]: v for k, v in ms.items() if k.startswith(phase + "/")
                and (allowed is None or k.split("/")[1] in allowed)}
        name = min(opts, key=opts.get)
        return name, opts[name]

    ig = best("input_grad")
    plans = []
    for fwd, t_fwd in ((k.split("/")[1], v) for k, v in ms.items() if k.startswith("forward/")):
        wg_allowed = {"masked_dense", "gather"} | ({SHARED} if fwd in ("csr", "bsr") else set())
        wg = best("weight_grad", wg_allowed)
        plans.append((t_fwd + ig[1] + wg[1], fwd, wg))
    total, fwd, wg = min(plans)
    dense = ms["forward/masked_dense"] + ms["input_grad/masked_dense"] + ms["weight_grad/masked_dense"]
    wg_only = best("weight_grad", {"masked_dense", "gather"})
    return {"forward": fwd, "input_grad": ig[0], "weight_grad": wg[0], "ms": total, "masked_dense_ms": dense,
            "weight_grad_only_saving_ms": ms["weight_grad/masked_dense"] - wg_only[1]}


def _cell(r: dict, phase: str, kernels: list[str]) -> str:
    return " ".join(f"{r['x_masked_dense'].get(f'{phase}/{k}', float('nan')):5.2f}" for k in kernels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's targets: 2)")
    ap.add_argument("--quick", action="store_true", help="few shapes, small batches, 3 repeats, no steps")
    ap.add_argument("--reps", type=int, default=0, help="timed rounds per layer case (default 7, --quick 3)")
    ap.add_argument("--step-rounds", type=int, default=5, help="rounds of the whole-step timing")
    ap.add_argument("--kernels", default=DEFAULT_KERNELS, help=f"subset of {KERNELS}")
    ap.add_argument("--models", default="resnet32,resnet50")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--layers-from", default=None, help="part 1 from this earlier --out file (runs part 2 only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k not in KERNELS:
            ap.error(f"unknown kernel {k!r}: use some of {','.join(KERNELS)}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
           "machine": machine(), "reps": reps, "kernels": kernels, "layers": [], "steps": {}, "estimate": {}}
    log(f"machine: {out['machine']}")
    specs = {"resnet32": (32 if args.quick else 128, 32, 10), "resnet50": (2 if args.quick else 8, 224, 1000)}
    models = args.models.split(",")
    head = " ".join(f"{k[:5]:>5}" for k in kernels)
    log(f"\nper layer, kernel / masked_dense (median of per-round ratios); fwd ms and pieces in ms\n"
        f"{'model':<9} {'shape':<42} {'n':>2} {'pat':>4} {'fwd ms':>7} | fwd {head} | igrad {head} | "
        f"wgrad gath shrd | im2col unfold fold | repack csr ell rebuild index | pad ell_t conv_t | auto choice")
    if args.layers_from:
        earlier = json.loads(Path(args.layers_from).read_text())
        out["layers"], out["layers_from"] = earlier["layers"], {"file": args.layers_from, "command": earlier["command"],
                                                                 "machine": earlier["machine"]}
        models = []  # part 1 is taken, not measured
    for model_name in models:
        batch, image, classes = specs[model_name]
        shapes = layer_shapes(model_name, batch, image, classes)
        if args.quick:
            shapes = shapes[:2] + shapes[-2:]
        for e in shapes:
            rows = [bench_layer(e, p, kernels, reps) for p in PATTERNS]
            out["layers"].append({"model": model_name, **e, "count": len(e["layers"]), "results": rows})
            for r in rows:
                ms, x = r["ms"], r["x_masked_dense"]
                c = r["choice"]
                log(f"{model_name:<9} {_shape_str(e):<42} {len(e['layers']):>2} {r['pattern']:>4} "
                    f"{ms['forward/masked_dense']:7.2f} | {_cell(r, 'forward', kernels)} | "
                    f"{_cell(r, 'input_grad', kernels)} | {x['weight_grad/gather']:5.2f} "
                    f"{x.get(f'weight_grad/{SHARED}', float('nan')):5.2f} | "
                    f"{ms.get('piece/im2col_K_BL', 0):6.2f} {ms.get('piece/unfold_B_K_L', 0):6.2f} "
                    f"{ms.get('piece/fold', 0):6.2f} | {ms['piece/repack_csr']:6.2f} {ms['piece/repack_ell']:6.2f} "
                    f"{ms['piece/rebuild_csr']:6.2f} {ms['piece/build_index_csr'] + ms['piece/build_index_ell']:6.1f} "
                    f"| {r['padding']['ell_t']:4.2f} {r['padding']['conv_t']:4.2f} | "
                    f"{c['forward']}/{c['input_grad']}/{c['weight_grad']} "
                    f"{c['ms'] / c['masked_dense_ms']:.2f}x")
    if not (args.skip_steps or args.quick):
        for model_name in args.models.split(","):
            whole_steps(model_name, specs[model_name], out, args.step_rounds, log)
    if args.out:
        write_json(args.out, out, log)
    return 0


def whole_steps(model_name: str, spec: tuple, out: dict, rounds: int, log) -> None:
    """Part 2: measured dense / BAME steps and the estimate from the per-layer choices."""
    batch, image, classes = spec
    dev = torch.device("cpu")
    log(f"\n{model_name} whole training steps, batch {batch}, ledger and recorders off:")
    variants = [Variant("dense", model_name, "dense", "2:4", batch, image, classes, dev, instrument=False).build()]
    for p in PATTERNS:
        for kernel in ("masked_dense", "auto"):
            variants.append(Variant(f"bame_{kernel}_{p}", model_name, "bame", p, batch, image, classes, dev,
                                    instrument=False, weight_grad_kernel=kernel).build())
    interleaved(variants, rounds, 1, warmup=2, log=log)
    by = {v.label: v for v in variants}
    out["steps"][model_name] = {"batch": batch, "all_s": {v.label: v.times for v in variants},
                                "x_dense": {v.label: paired_ratio(v.times, by["dense"].times) for v in variants}}
    log("  " + ", ".join(f"{v.label} {median(v.times) * 1e3:.0f} ms" for v in variants))
    layers = [lay for lay in out["layers"] if lay["model"] == model_name and not lay["layers"][0].startswith("(")]
    share, step_s = in_model_times(model_name, spec)
    out["steps"][model_name]["profiled_dense_step_s"] = step_s
    for p in PATTERNS:
        md_x = paired_ratio(by[f"bame_masked_dense_{p}"].times, by["dense"].times)["median"]
        auto_x = paired_ratio(by[f"bame_auto_{p}"].times, by["dense"].times)["median"]
        n, m = (int(v) for v in p.split(":"))
        saved = saved_wg = free = ideal = layers_frac = 0.0
        choices = []
        for lay in layers:
            r = next(r for r in lay["results"] if r["pattern"] == p)
            ms, x, c = r["ms"], r["x_masked_dense"], r["choice"]
            fwd_s, bwd_s = share[(tuple(lay["input"]), tuple(lay["weight"]))]  # all layers of this shape, per step
            ig = ms["input_grad/masked_dense"] / (ms["input_grad/masked_dense"] + ms["weight_grad/masked_dense"])
            phases = {"forward": fwd_s / step_s, "input_grad": bwd_s * ig / step_s, "weight_grad": bwd_s * (1 - ig) / step_s}
            saved += sum(f * (1 - x[f"{ph}/{c[ph]}"]) for ph, f in phases.items())
            saved_wg += phases["weight_grad"] * max(0.0, 1 - x["weight_grad/gather"])
            free += phases["forward"] + phases["input_grad"]
            ideal += sum(phases.values()) * (1 - n / m)
            layers_frac += sum(phases.values())
            choices.append({"shape": _shape_str(lay), "count": lay["count"], "step_fraction": phases,
                            **{ph: c[ph] for ph in phases}})
        est = {"bame_masked_dense_x": md_x, "bame_auto_measured_x": auto_x, "bame_auto_predicted_x": md_x - saved_wg,
               "estimate_x": md_x - saved, "layers_share_of_dense_step": layers_frac,
               "if_fwd_and_igrad_were_free_x": md_x - free, "ideal_flops_x": md_x - ideal, "choices": choices}
        out["estimate"][f"{model_name} {p}"] = est
        log(f"  {p}: bame masked_dense {md_x:.3f}x dense; bame auto (weight grad) measured {auto_x:.3f}x, predicted "
            f"{est['bame_auto_predicted_x']:.3f}x; with per-shape sparse kernels estimated "
            f"**{est['estimate_x']:.3f}x**; N:M layers are {layers_frac:.0%} of the dense step; if forward + input "
            f"grad cost nothing {est['if_fwd_and_igrad_were_free_x']:.3f}x; every N:M layer phase at N/M of its "
            f"dense time {est['ideal_flops_x']:.3f}x")


def in_model_times(model_name: str, spec: tuple, steps: int = 2) -> tuple[dict, float]:
    """Seconds per dense step spent in each conv shape's forward and backward, from the profiler:
    ``{(input shape, weight shape): (forward_s, backward_s)}`` (summed over the layers of that shape), and
    the profiled step's seconds."""
    batch, image, classes = spec
    v = Variant("dense", model_name, "dense", "2:4", batch, image, classes, torch.device("cpu"), instrument=False).build()
    v.step(), v.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            v.step()
        step_s = (time.perf_counter() - t0) / steps
    share: dict[tuple, list[float]] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::conv2d":  # (input, weight, bias, ...)
            share.setdefault((tuple(e.input_shapes[0]), tuple(e.input_shapes[1])), [0.0, 0.0])[0] += e.cpu_time_total
        elif e.key == "aten::convolution_backward":  # (grad_out, input, weight, ...)
            share.setdefault((tuple(e.input_shapes[1]), tuple(e.input_shapes[2])), [0.0, 0.0])[1] += e.cpu_time_total
    return {k: (f / 1e6 / steps, b / 1e6 / steps) for k, (f, b) in share.items()}, step_s


if __name__ == "__main__":
    sys.exit(main())
