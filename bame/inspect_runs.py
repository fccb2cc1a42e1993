"""``bame inspect``: what a run folder holds, in words (or one line per run of a folder of runs): its status as
recorded and as it really is (a live writer, or a stale one), its config, progress, accuracy and FLOPs, and
how to resume it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError
from .console import warning
from .contract import CHECKPOINT, COMPLETED, FAILED, INTERRUPTED, MANIFEST, ROW_MASKS, RUNNING, pattern_label
from .runs import RunFolderError, RunReader, config_pattern_label, find_runs, load_run

__all__ = ["add_inspect_parser", "cmd_inspect", "describe_run", "describe_runs", "run_state"]


def add_inspect_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``inspect`` to a ``bame`` sub-command parser; sets ``func=cmd_inspect``."""
    p = sub.add_parser("inspect", help="summarise a run folder (or every run in a folder)")
    p.add_argument("run_dir", nargs="+", help="a run folder, or a folder of run folders")
    p.set_defaults(func=cmd_inspect)
    return p


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or x == "":
        return "-"
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return str(x)


def _last(rows: list[dict], split: str) -> Optional[dict]:
    for row in reversed(rows):
        if row.get("split") == split:
            return row
    return None


def run_state(run: RunReader) -> str:
    """The manifest's status, or what is really going on: ``running (process N)`` while a process holds
    the folder's lock, ``stale (process N not running)`` when the manifest says running and none does."""
    status = str(run.manifest.get("status", "?"))
    pid = run.writing_pid()
    if pid is None:
        return status
    holder = run.lock_holder()
    if holder is None:
        return f"stale (process {pid} not running)"
    return f"running ({holder})" if status == RUNNING else f"{status}, extension running ({holder})"


def _extension_lines(run: RunReader, m: dict) -> list[str]:
    """The last resume of a completed run, when it did not complete (the run stays completed)."""
    resumes = m.get("resumes") or []
    last = resumes[-1] if resumes else {}
    if m.get("status") != COMPLETED or last.get("previous_status") != COMPLETED:
        return []
    if last.get("status") in (None, COMPLETED):
        return []
    lines = [f"extension from step {last.get('from_step')} to {last.get('to_step')}: {last['status']}"
             + (f" ({last['error']})" if last.get("error") else "")
             + f"; DONE and summary.json still describe step {last.get('from_step')}"]
    if last.get("status") != RUNNING or run.lock_holder() is None:
        more = f" --set train.max_steps={last['max_steps']}" if last.get("max_steps") else ""
        lines.append(f"resume    bame train --resume {run.path}{more}")
    return lines


def describe_run(run: RunReader) -> str:
    """A readable multi-line summary of one run folder; a damaged manifest, config or summary raises
    ``RunFolderError`` naming the file."""
    m = run.manifest
    state = run_state(run)
    lines = [f"run       {run.id}  ({run.path})",
             f"status    {state}" + ("  [DONE]" if run.done else "")
             + f"  started {m.get('started')}" + (f", finished {m.get('finished')}" if m.get("finished") else "")]
    try:
        c = run.config
        t = c.train
        length = f"{t.epochs:g} epochs" + (f", max_steps {t.max_steps}" if t.max_steps is not None else "")
        structure = f" {c.method.mask_structure}" if c.method.mask_structure != ROW_MASKS else ""
        lines.append(f"config    {c.name}: {c.data.name} / {c.model.name} / {c.method.name} {config_pattern_label(c)}"
                     f"{structure} "
                     f"/ seed {t.seed} / {length}, batch {t.batch_size}, lr {t.lr:g} ({t.lr_schedule}"
                     f"{f', warm-up {t.warmup_epochs:g} ep' if t.warmup_epochs else ''}), wd {t.weight_decay:g}, "
                     f"label smoothing {t.label_smoothing:g}")
    except ConfigError as err:
        lines.append(f"config    does not load in this bame: {'; '.join(err.errors)}")
    s = run.summary if run.done else None
    metrics = run.rows("metrics")
    if s is not None:
        f = s["final"]
        lines.append(f"progress  {s['steps']} / {s['schedule_steps']} steps ({s['epochs']:.2f} epochs, "
                     f"{s['steps_per_epoch']} steps/epoch)")
        lines.append(f"accuracy  test top-1 {_fmt(f.get('test_acc'))} (loss {_fmt(f.get('test_loss'))}), "
                     f"best {_fmt(s.get('best_test_acc'))}; train loss {_fmt(f.get('train_loss'))}")
        fl = s["flops"]
        lines.append(f"FLOPs     ideal {fl['ideal_macs']:.4g} MACs = {fl['ideal_flops']:.4g} FLOPs; executed "
                     f"{fl['executed_macs']:.4g} MACs = {fl['executed_flops']:.4g} FLOPs  ({fl['convention']})")
        if fl.get("dense_macs"):
            lines.append(f"            dense training of the same model for the same steps: {fl['dense_macs']:.4g} MACs; "
                         f"ideal = {fl['ideal_x_dense']:.3f} x dense")
        for phase, v in sorted(fl.get("by_phase", {}).items()):
            lines.append(f"            {phase:<12} ideal {v['ideal_macs']:.4g}  executed {v['executed_macs']:.4g} MACs")
        lines.append(f"wall time {s['wall_time_s']:.1f} s on {s.get('device')}")
    else:
        last_train, last_test = _last(metrics, "train"), _last(metrics, "test")
        lines.append(f"progress  last logged step {last_train['step'] if last_train else '-'}, "
                     f"checkpoint at step {m.get('checkpoint_step', '-')}")
        if last_test:
            lines.append(f"accuracy  last test top-1 {_fmt(last_test.get('acc'))} at step {last_test.get('step')}")
    decisions = run.rows("sparsify")
    if decisions:
        sparse = sum(1 for d in decisions if str(d.get("sparse")).lower() == "true")
        lines.append(f"sparsify  {len(decisions)} decisions: {sparse} sparse, {len(decisions) - sparse} dense")
    g = m.get("git") or {}
    if g.get("commit"):
        dirty = f", dirty (diff sha256 {g['diff_sha256'][:12]})" if g.get("dirty") else ""
        lines.append(f"git       {g['commit'][:12]}{dirty}")
    if m.get("resumes"):
        lines.append(f"resumed   {len(m['resumes'])}x (from steps {[r.get('from_step') for r in m['resumes']]})")
    lines += _extension_lines(run, m)
    if m.get("error"):
        lines.append(f"error     {m['error']}")
    if (state.startswith("stale") and m.get("status") == RUNNING) or m.get("status") in (FAILED, INTERRUPTED):
        # the checkpoint is written before the manifest records it: a writer killed in between left one
        saved = m.get("checkpoint_step") is not None or (Path(run.path) / CHECKPOINT).is_file()
        lines.append(f"resume    bame train --resume {run.path}" if saved
                     else "resume    none: it saved no checkpoint; train it again")
    return "\n".join(lines)


def describe_runs(runs: list[RunReader]) -> str:
    """One line per run: id, status, method, pattern, seed, steps, final test accuracy, ideal FLOPs."""
    lines = [f"{'run':<52} {'status':<11} {'method':<7} {'pattern':<7} {'seed':>4} {'steps':>7} "
             f"{'test acc':>8} {'ideal FLOPs':>11}"]
    for run in runs:
        try:
            lines.append(_run_line(run))
        except RunFolderError as err:
            lines.append(f"{run.id:<52} {'damaged':<11} (see the warning)")
            warning(f"{err} (listed as damaged)")
    return "\n".join(lines)


def _run_line(run: RunReader) -> str:
    m = run.manifest
    s = run.summary if run.done else None
    steps = s["steps"] if s else "-"
    acc = _fmt(s["final"]["test_acc"]) if s else "-"
    flops = f"{s['flops']['ideal_flops']:.3g}" if s else "-"
    seed = (m.get("seeds") or {}).get("train.seed", "-")
    state = run_state(run)
    status = "stale" if state.startswith("stale") else m.get("status", "?")
    pattern = pattern_label(m.get("method"), m.get("pattern", "?"))
    return (f"{run.id:<52} {status:<11} {m.get('method', '?'):<7} {pattern:<7} "
            f"{seed!s:>4} {steps!s:>7} {acc:>8} {flops:>11}")


def cmd_inspect(args: argparse.Namespace) -> int:
    for i, path in enumerate(args.run_dir):
        p = Path(path)
        if i:
            print()
        if (p / MANIFEST).is_file():
            print(describe_run(load_run(p)))
            continue
        runs = find_runs(p)
        if not runs:
            load_run(p)  # raises the one-line RunNotFoundError
        print(describe_runs(runs))
    return 0
