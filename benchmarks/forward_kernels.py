"""Whole training steps with each forward / input-gradient kernel setting, side by side with dense.

    python benchmarks/forward_kernels.py [--models resnet32,resnet50] [--patterns 2:4,1:8,1:16]
        [--variants masked_dense,sparse,auto] [--compile-kernels] [--rounds 7] [--threads 2] [--out results.json]

Per model (ResNet-32 at batch 128, ResNet-50 at batch 8, as ``step_time.py`` on the CPU) and pattern, these
variants step on a fixed random batch, interleaved round-robin (``common.interleaved``), ledger and recorders
on, BAME outside adaptation:

- ``dense``;
- ``masked_dense``: BAME with every phase on the masked dense kernels (today's default);
- ``sparse``: ``method.forward_kernel`` and ``input_grad_kernel`` ``sparse`` (MKL CSR), weight gradient
  ``gather`` (the SDDMM, on the forward's conv columns);
- ``auto``: all three phases ``auto`` (eager candidates: masked dense, csr, bsr; the SDDMM, on the forward's
  conv columns where it ran csr/bsr);
- ``auto_compiled`` (``--compile-kernels``): ``auto`` that also times the compiled ELL and direct kernels.

``--variants`` picks some of them (``dense`` always runs: the ratios are to it), e.g. ``masked_dense,auto``
to leave out the slow ``sparse``.

Printed and written: each variant's step / dense step (median of the per-round ratios, [q1, q3]), and every
``auto`` decision (phase, layer shape, kernel chosen, the candidates' median seconds): the per-layer view of
where each kernel wins. Ratios, not seconds: the machine may be shared; ``machine`` records the load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, interleaved, machine, median, paired_ratio, write_json  # noqa: E402

import bame.forward_kernels as fk  # noqa: E402
import bame.kernels as wk  # noqa: E402

MODELS = {"resnet32": (128, 32, 10), "resnet50": (8, 224, 1000)}  # batch, image, classes
SETTINGS = {  # label -> (forward, input gradient, weight gradient, compile)
    "masked_dense": ("masked_dense", "masked_dense", "masked_dense", False),
    "sparse": ("sparse", "sparse", "gather", False),
    "auto": ("auto", "auto", "auto", False),
    "auto_compiled": ("auto", "auto", "auto", True),
}


def _choice_rows(before_fwd: int, before_wg: int) -> list[dict]:
    rows = [{"phase": c.key[0], "shape": c.key[4:], "chosen": c.name,
             "ms": {k: (round(v * 1e3, 3) if isinstance(v, float) else v) for k, v in c.seconds.items()}}
            for c in fk.kernel_choices()[before_fwd:]]
    rows += [{"phase": "weight_grad", "shape": c.key, "chosen": c.name,
              "ms": {"gather (shared columns)" if c.shared_columns else "gather": round(c.gather_s * 1e3, 3),
                     "masked_dense": round(c.masked_dense_s * 1e3, 3)}}
             for c in wk.auto_kernel_choices()[before_wg:]]
    return rows


def run(model: str, pattern: str, args, log) -> dict:
    batch, image, classes = MODELS[model]
    batch = args.batch or batch
    dev = torch.device("cpu")
    labels = args.variants
    before_fwd, before_wg = len(fk.kernel_choices()), len(wk.auto_kernel_choices())
    variants = [Variant("dense", model, "dense", pattern, batch, image, classes, dev).build()]
    for label in labels:
        f, i, w, c = SETTINGS[label]
        variants.append(Variant(label, model, "bame", pattern, batch, image, classes, dev, weight_grad_kernel=w,
                                forward_kernel=f, input_grad_kernel=i, compile_kernels=c).build())
    log(f"\n== {model} batch {batch}, {pattern}: {', '.join(v.label for v in variants)}")
    interleaved(variants, args.rounds, 1, warmup=args.warmup, log=log)  # auto decides in the warm-up steps
    dense = variants[0].times
    res = {"batch": batch, "step_s": {v.label: median(v.times) for v in variants},
           "x_dense": {v.label: paired_ratio(v.times, dense) for v in variants[1:]},
           "all_s": {v.label: v.times for v in variants}, "auto_choices": _choice_rows(before_fwd, before_wg)}
    for v in variants[1:]:
        r = res["x_dense"][v.label]
        log(f"  {v.label:<14} {r['median']:.3f}x dense  [{r['q1']:.3f}, {r['q3']:.3f}]")
    return res


def markdown(out: dict) -> str:
    """The two tables of docs/performance.md: step / dense step per setting, and the auto decisions per layer."""
    labels = [k for k in SETTINGS if any(k in r["x_dense"] for r in out["results"].values())]
    lines = ["| model, pattern | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, r in out["results"].items():
        cells = [f"{r['x_dense'][k]['median']:.2f}x [{r['x_dense'][k]['q1']:.2f}, {r['x_dense'][k]['q3']:.2f}]"
                 if k in r["x_dense"] else "-" for k in labels]
        lines.append(f"| {name} (batch {r['batch']}) | " + " | ".join(cells) + " |")
    lines += ["", "| model, pattern | phase | layer (weight; input) | chosen | ms per candidate |", "|---|---|---|---|---|"]
    for name, r in out["results"].items():
        for c in r["auto_choices"]:
            shape = c["shape"]
            what = f"{'x'.join(map(str, shape[1]))}; {'x'.join(map(str, shape[2]))}" if len(shape) > 2 else str(shape)
            if shape and shape[0] == "conv" and len(shape) > 3:
                what += f" s{shape[3][0][0]}"
            ms = ", ".join(f"{k} {v}" for k, v in c["ms"].items())
            lines.append(f"| {name} | {c['phase']} | {what} | {c['chosen']} | {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet32,resnet50")
    ap.add_argument("--patterns", default="2:4,1:8,1:16")
    ap.add_argument("--variants", default=None,
                    help=f"comma list of {', '.join(SETTINGS)} (default: all but auto_compiled; dense runs "
                         "always)")
    ap.add_argument("--compile-kernels", action="store_true", help="add the auto_compiled variant")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: 128 for resnet32, 8 for resnet50)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="print the tables of a written JSON and exit")
    args = ap.parse_args(argv)
    default = [k for k in SETTINGS if args.compile_kernels or k != "auto_compiled"]
    args.variants = default if args.variants is None else args.variants.split(",")
    unknown = [v for v in args.variants if v not in SETTINGS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: use some of {', '.join(SETTINGS)}")
    if args.compile_kernels and "auto_compiled" not in args.variants:
        args.variants.append("auto_compiled")
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(), "results": {}}
    log(f"machine: {out['machine']}")
    for model in args.models.split(","):
        for pattern in args.patterns.split(","):
            out["results"][f"{model} {pattern}"] = run(model, pattern, args, log)
            if args.out:  # partial results survive an interrupted run
                write_json(args.out, {**out, "machine_after": machine()}, log)
    out["machine_after"] = machine()
    log("\n" + markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
