"""Training step time of each method relative to dense, measured side by side in one process.

    python benchmarks/step_time.py [--device cpu|cuda] [--quick] [--out results.json]

For each model (CIFAR ResNet-32 at 32x32, torchvision ResNet-50 at 224) every variant gets its own model,
method, optimizer, FLOPs ledger and recorders, and steps on a fixed random batch (no data loading) in the
order of ``bame/train.py``. The variants run interleaved: round-robin (the order rotating each round),
several rounds, median per variant, so that a machine whose load changes during the run slows every
variant alike. Variants:

- ``dense``, ``static``, ``srste``, ``ste``: the methods; ``bame``: a BAME step outside adaptation;
- ``bame_adapt``: a BAME adaptation step with every block a candidate (the first adaptation step's cost:
  an upper bound for the later ones, where frozen blocks and a decayed budget compute less);
- ``dense_bare``, ``bame_bare``: ledger and recorders off (their overhead is ``x / x_bare - 1``).

Peak memory: each variant again in a fresh subprocess (``--probe``), maxrss after building minus maxrss
after a few steps on the CPU (``resource.getrusage``; tracemalloc does not see torch's allocations), or
``torch.cuda.max_memory_allocated`` on a GPU.

Targets (PASS/FAIL): a BAME normal step <= 1.15x a dense step; adaptation amortised under the default
schedule (``method.bame`` defaults: every ``interval_steps`` = 100 steps in the first ``t_f_fraction`` =
50% of training) < 5% of training time; recorders (ledger + recorders on vs off) < 3%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, interleaved, machine, median, paired_ratio, sync, write_json  # noqa: E402

from bame.config import BameConfig  # noqa: E402
from bame.schedule import adaptation_steps, resolve_interval, resolve_window  # noqa: E402

METHODS = ["dense", "static", "srste", "ste", "bame", "bame_adapt"]
BARE = ["dense", "bame"]  # also measured with ledger and recorders off
LAUNCHER = [sys.executable, "-S", "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
TARGET_STEP = 1.15
TARGET_ADAPT = 0.05
TARGET_RECORDERS = 0.03

# model, image size, classes, batch per device (cpu, cuda), batch under --quick (cpu, cuda), steps per round
MODELS = {
    "resnet32": dict(image=32, classes=10, batch={"cpu": 128, "cuda": 128}, quick={"cpu": 32, "cuda": 128},
                     steps={"cpu": 2, "cuda": 20}),
    "resnet50": dict(image=224, classes=1000, batch={"cpu": 8, "cuda": 64}, quick={"cpu": 2, "cuda": 32},
                     steps={"cpu": 1, "cuda": 10}),
}


def amortised_adaptation(t_normal: float, t_adapt: float, total_steps: int) -> dict:
    """Adaptation's share of training time under the default BAME schedule over ``total_steps``."""
    b = BameConfig()
    t_i, t_f = resolve_window(b.t_i_steps, b.t_i_fraction, b.t_f_steps, b.t_f_fraction, total_steps)
    interval = resolve_interval(b.interval_steps, b.interval_fraction, total_steps)
    n = len(adaptation_steps(t_i, t_f, interval, b.interval_anchor))
    extra = max(0.0, t_adapt - t_normal)
    total = total_steps * t_normal + n * extra
    return {"schedule_steps": total_steps, "adaptation_steps": n, "extra_s_per_adaptation": extra,
            "fraction": n * extra / total if total else 0.0,
            "note": f"every adaptation step costs as the first (all blocks candidates): an upper bound; "
                    f"interval {interval} steps, window [{t_i}, {t_f})"}


def probe(args) -> None:
    """``--probe``: build one variant, step a few times, print its memory as JSON (a fresh process)."""
    model, kind, batch, device = args.probe[0], args.probe[1], int(args.probe[2]), torch.device(args.probe[3])
    spec = MODELS[model]
    instrument = not kind.endswith("_bare")
    method = kind.removesuffix("_bare")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    v = Variant(kind, model, method, args.pattern, batch, spec["image"], spec["classes"], device,
                instrument=instrument, amp=_amp(args.amp), channels_last=args.channels_last,
                **_kernels(args)).build()
    sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(3):
        v.step()
    sync(device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rss_after_build_bytes": before, "rss_peak_bytes": after, "rss_step_delta_bytes": after - before}
    if device.type == "cuda":
        out.update(cuda_after_build_bytes=cuda_before, cuda_peak_bytes=torch.cuda.max_memory_allocated(device))
    print(json.dumps(out))


def _kernels(args) -> dict:
    """The kernel settings of the N:M variants (``Variant`` fields)."""
    return dict(weight_grad_kernel=args.weight_grad_kernel, forward_kernel=args.forward_kernel,
                input_grad_kernel=args.input_grad_kernel, compile_kernels=args.compile_kernels)


def _amp(name: str):
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def measure_memory(model: str, kinds: list[str], batch: int, args) -> dict:
    out = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--probe", model, kind, str(batch), args.device, "--pattern", args.pattern,
               "--weight-grad-kernel", args.weight_grad_kernel, "--forward-kernel", args.forward_kernel,
               "--input-grad-kernel", args.input_grad_kernel,
               "--amp", args.amp, "--threads", str(torch.get_num_threads())] + \
            (["--channels-last"] if args.channels_last else []) + (["--compile-kernels"] if args.compile_kernels else [])
        # Linux keeps a process's peak RSS across exec, and a child started straight from this (large)
        # process would start with its peak: a small launcher in between forks the probe afresh.
        res = subprocess.run(LAUNCHER + cmd, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            out[kind] = {"error": res.stderr[-2000:]}
            continue
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:8.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_model(model: str, args, log) -> dict:
    spec = MODELS[model]
    dev = torch.device(args.device)
    key = "cuda" if dev.type == "cuda" else "cpu"
    batch = (spec["quick"] if args.quick else spec["batch"])[key]
    steps = spec["steps"][key]
    rounds = args.rounds or (3 if args.quick else 7)
    kinds = METHODS + [f"{k}_bare" for k in BARE]
    log(f"\n== {model}: batch {batch} at {spec['image']}x{spec['image']}, pattern {args.pattern}, "
        f"weight_grad_kernel {args.weight_grad_kernel}, forward_kernel {args.forward_kernel}, "
        f"input_grad_kernel {args.input_grad_kernel}{' (compiled kernels too)' if args.compile_kernels else ''}, "
        f"{rounds} rounds x {steps} step(s), device {dev}")
    variants = [Variant(k, model, k.removesuffix("_bare"), args.pattern, batch, spec["image"], spec["classes"], dev,
                        instrument=not k.endswith("_bare"), amp=_amp(args.amp), channels_last=args.channels_last,
                        **_kernels(args)).build() for k in kinds]
    t0 = time.perf_counter()
    interleaved(variants, rounds, steps, warmup=args.warmup, log=log)
    med = {v.label: median(v.times) for v in variants}
    by = {v.label: v for v in variants}
    # Ratios are paired: the median over rounds of (a / b) within each round, where the two ran back to back,
    # so that a change of the machine's load between rounds cancels; [q1, q3] of the per-round ratios.
    x_dense = {k: paired_ratio(by[k].times, by["dense"].times) for k in kinds}
    res: dict = {"batch": batch, "image": spec["image"], "rounds": rounds, "steps_per_round": steps,
                 "seconds": round(time.perf_counter() - t0, 1),
                 "step_s": {k: {"median": med[k], "all": [round(t, 5) for t in v.times]}
                            for k, v in zip(kinds, variants)},
                 "x_dense": {k: r["median"] for k, r in x_dense.items()},
                 "x_dense_q1_q3": {k: [r["q1"], r["q3"]] for k, r in x_dense.items()}}
    total = args.schedule_steps.get(model, 100_000)
    adapt_ratio = paired_ratio(by["bame_adapt"].times, by["bame"].times)
    adapt = amortised_adaptation(med["bame"], med["bame"] * adapt_ratio["median"], total)
    rec_pairs = {k: paired_ratio(by[k].times, by[f"{k}_bare"].times) for k in BARE}
    rec = {k: r["median"] - 1 for k, r in rec_pairs.items()}
    res["recorder_overhead_q1_q3"] = {k: [r["q1"] - 1, r["q3"] - 1] for k, r in rec_pairs.items()}
    res["adaptation"] = adapt
    res["recorder_overhead"] = rec
    res["targets"] = {
        "bame_step_x_dense": {"value": x_dense["bame"]["median"], "target": f"<= {TARGET_STEP}",
                              "pass": x_dense["bame"]["median"] <= TARGET_STEP},
        "adaptation_amortised": {"value": adapt["fraction"], "target": f"< {TARGET_ADAPT}",
                                 "pass": adapt["fraction"] < TARGET_ADAPT},
        "recorders_overhead": {"value": rec["bame"], "target": f"< {TARGET_RECORDERS}",
                               "pass": rec["bame"] < TARGET_RECORDERS},
    }
    log(f"\n{model} (batch {batch}), median step time, ledger + recorders on unless '_bare':")
    log(f"  {'variant':<16} {'ms/step':>9} {'x dense':>8}  {'[q1, q3] of the rounds':>22}")
    for k in kinds:
        r = x_dense[k]
        log(f"  {k:<16} {med[k] * 1e3:9.1f} {r['median']:8.3f}  [{r['q1']:.3f}, {r['q3']:.3f}]")
    t = res["targets"]
    log(f"  bame step / dense step             {t['bame_step_x_dense']['value']:.3f}  (target <= {TARGET_STEP}) "
        f"{verdict(t['bame_step_x_dense']['pass'])}")
    log(f"  adaptation step extra cost         {adapt['extra_s_per_adaptation'] * 1e3:.1f} ms "
        f"({adapt_ratio['median']:.2f}x a bame step)")
    log(f"  adaptation amortised ({adapt['adaptation_steps']} of {total} steps) "
        f"{adapt['fraction'] * 100:.2f}%  (target < {TARGET_ADAPT * 100:.0f}%) {verdict(t['adaptation_amortised']['pass'])}")
    q = res["recorder_overhead_q1_q3"]
    log(f"  recorders+ledger overhead, bame    {rec['bame'] * 100:+.1f}% [{q['bame'][0] * 100:+.1f}, "
        f"{q['bame'][1] * 100:+.1f}]  (target < {TARGET_RECORDERS * 100:.0f}%) "
        f"{verdict(t['recorders_overhead']['pass'])};  dense {rec['dense'] * 100:+.1f}% "
        f"[{q['dense'][0] * 100:+.1f}, {q['dense'][1] * 100:+.1f}]")
    if not args.no_memory:
        mem = measure_memory(model, kinds, batch, args)
        res["memory"] = mem
        cuda = dev.type == "cuda"
        log(f"  peak memory per variant (fresh process each; {'CUDA max_memory_allocated' if cuda else 'maxrss'}):")
        log(f"  {'variant':<16} {'peak MiB':>9} {'step delta MiB':>15}")
        for k, m in mem.items():
            if "error" in m:
                log(f"  {k:<16} error: {m['error'][-200:]}")
            elif cuda:
                log(f"  {k:<16} {_mib(m['cuda_peak_bytes'])} {_mib(m['cuda_peak_bytes'] - m['cuda_after_build_bytes'])}")
            else:
                log(f"  {k:<16} {_mib(m['rss_peak_bytes'])} {_mib(m['rss_step_delta_bytes'])}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--quick", action="store_true", help="smaller batches, 3 rounds (a smoke run, noisier)")
    ap.add_argument("--models", default="resnet32,resnet50")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--weight-grad-kernel", default="masked_dense", choices=["masked_dense", "gather", "auto"],
                    help="method.weight_grad_kernel of the SPARSE-backward variants (static, bame)")
    ap.add_argument("--forward-kernel", default="masked_dense", choices=["masked_dense", "sparse", "auto"],
                    help="method.forward_kernel of the N:M variants")
    ap.add_argument("--input-grad-kernel", default="masked_dense", choices=["masked_dense", "sparse", "auto"],
                    help="method.input_grad_kernel of the N:M variants")
    ap.add_argument("--compile-kernels", action="store_true",
                    help="method.compile_kernels: auto also times the torch.compile'd ELL and direct kernels")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of the round-robin (default 7, --quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype (cuda)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (default: 1 on the CPU: on a shared machine two threads were "
                         "slower and far noisier; the torch default on a GPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--probe", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads or (1 if torch.device(args.device).type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.probe:
        probe(args)
        return 0
    # schedules the amortisation is computed for: configs/paper/{cifar10_resnet32,imagenet_resnet50}.yaml
    # (300 epochs at batch 256; 120 epochs at batch 256)
    args.schedule_steps = {"resnet32": 300 * (50_000 // 256), "resnet50": 120 * (1_281_167 // 256)}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(),
           "device": args.device, "pattern": args.pattern, "weight_grad_kernel": args.weight_grad_kernel,
           "forward_kernel": args.forward_kernel, "input_grad_kernel": args.input_grad_kernel,
           "compile_kernels": args.compile_kernels,
           "amp": args.amp, "channels_last": args.channels_last,
           "quick": args.quick, "targets": {"bame_step_x_dense": TARGET_STEP, "adaptation_amortised": TARGET_ADAPT,
                                            "recorders_overhead": TARGET_RECORDERS}, "models": {}}
    log(f"machine: {out['machine']}")
    for model in args.models.split(","):
        out["models"][model] = run_model(model, args, log)
    out["machine_after"] = machine()
    if args.out:
        write_json(args.out, out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
