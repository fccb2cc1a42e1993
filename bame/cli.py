"""The ``bame`` command line: ``train``, ``sweep``, ``inspect``, ``data``, ``flops``.

::

    bame train --config configs/quick.yaml [--set method.pattern=1:16 ...] [--out runs]
    bame train --resume runs/<id> [--set train.max_steps=N]
    bame sweep --config FILE --methods bame,srste --patterns 2:4,1:16 --seeds 0,1,2 [--out runs]
    bame inspect runs/<id>        (or a folder of runs: one line each)
    bame data ...                  (bame.data)
    bame flops ...                 (bame.flops)
    bame export RUN_DIR            (bame.export)
    bame report DIR [--out FILE]   (bame.report: tables, figures and commands of a folder of runs)

User mistakes (a missing file, a bad key or pattern, a data set not on disk, a missing, locked or
damaged run folder, an unsafe checkpoint) print one line per problem and exit with status 2, without a
traceback. Exit status: 0 ok; 1 a sweep run failed or diverged; 2 a user mistake; 3 the run diverged;
128 + N a run stopped by signal N at the end of a step, with a checkpoint (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Optional
from collections.abc import Callable, Sequence

from .config import Config, ConfigError, dump_yaml, experiment_identity, load_config
from .contract import COMPLETED, DIVERGED, FAILED, INTERRUPTED, MANIFEST, RUNNING, pattern_label
from .progress import SweepProgress
from .runs import RunFolderError, RunNotFoundError, RunReader, find_runs, load_run

__all__ = ["main", "build_parser"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it


def _err(msg: str) -> None:
    print(f"bame: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"bame: warning: {msg}", file=sys.stderr)


def _flatten_sets(sets: Optional[list[list[str]]]) -> list[str]:
    return [item for group in (sets or []) for item in group]


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _command(argv: Optional[Sequence[str]]) -> list[str]:
    return ["bame", *(sys.argv[1:] if argv is None else list(argv))]


# --------------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import join_process_group

    joined = join_process_group()
    try:
        return _train(args)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    from .training import train

    sets = _flatten_sets(args.set)
    progress = False if args.no_progress else None
    if args.resume is not None:
        cfg = load_config(args.config, sets) if args.config is not None else None
        result = train(cfg, resume=args.resume, overrides=None if cfg is not None else sets,
                       command=args.command, progress=progress)
    else:
        if args.config is None:
            _err("bame train needs --config FILE (or --resume RUN_DIR)")
            return EXIT_USAGE
        cfg = load_config(args.config, sets)
        result = train(cfg, out_dir=args.out, command=args.command, progress=progress)
    if result.run_dir is not None:
        print(result.run_dir)
    if result.status == DIVERGED:
        _err(_diverged_message(result))
        return EXIT_DIVERGED
    return 0


def _diverged_message(result: Any) -> str:
    """The manifest's account of a diverged run (an extension's is in its resume entry)."""
    if result.run_dir is None:
        return "the run diverged (see rank 0's run folder)"
    m = load_run(result.run_dir).manifest
    return f"run {result.run_id} {m.get('error') or (m.get('resumes') or [{}])[-1].get('error')}"


# --------------------------------------------------------------------------------------------------
# sweep


def finished_runs(out: Path, statuses: tuple[str, ...] = (COMPLETED,),
                  warn: Optional[Callable[[str], None]] = None) -> Callable[[Config], Optional[RunReader]]:
    """A look-up from a config to a run in ``out`` of the same experiment (see ``experiment_identity``)
    that ended with one of ``statuses`` (a completed run also needs its ``DONE``). The run folders are
    read once, not once per config looked up; a damaged one is reported through ``warn`` and passed over."""
    found = []
    for run in find_runs(out):
        try:
            status = run.status
            if status not in statuses or (status == COMPLETED and not run.done):
                continue
            found.append((experiment_identity(run.config), run))
        except RunFolderError as err:
            if warn is not None:
                warn(f"{err} (passed over)")
        except (ConfigError, OSError):
            continue  # an older run whose config no longer loads cannot be a match

    def lookup(cfg: Config) -> Optional[RunReader]:
        identity = experiment_identity(cfg)
        return next((run for ident, run in found if ident == identity), None)

    return lookup


def completed_runs(out: Path) -> Callable[[Config], Optional[RunReader]]:
    """:func:`finished_runs` of completed runs only (the sweep and the demo skip those)."""
    return finished_runs(out, (COMPLETED,))


def _sweep_in_processes(args: argparse.Namespace, todo: list, total: int, out: Path,
                        progress: SweepProgress) -> tuple[list, list, list]:
    """Run the sweep's runs as ``bame train`` subprocesses, ``args.jobs`` at a time.

    Each process gets ``cpu_count // jobs`` threads (OMP_NUM_THREADS), so the jobs share the machine
    instead of fighting over it; each one's output goes to ``OUT/sweep-logs/<label>.log``.
    Returns the labels that completed, failed and diverged.
    """
    import concurrent.futures
    import hashlib
    import subprocess
    import time

    logs = out / "sweep-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def one(item: tuple) -> tuple[str, int, Path, float]:
        i, label, _, cfg = item
        # The child trains exactly the config resolved here (not one it would resolve itself later).
        text = dump_yaml(cfg)
        stem = f"{_slug_label(label)}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
        log, resolved = logs / f"{stem}.log", logs / f"{stem}.yaml"
        resolved.write_text(text)
        cmd = [sys.executable, "-m", "bame", "train", "--config", str(resolved), "--out", str(out), "--no-progress"]
        print(f"[{i}/{total}] run {label} (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "a") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        return label, rc, log, time.perf_counter() - start

    done, failed, diverged = [], [], []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, item) for item in todo]):
            label, rc, log, seconds = future.result()
            if rc == 0:
                done.append(label)
            elif rc == EXIT_DIVERGED:
                diverged.append(label)
                _err(f"{label}: diverged, see {log}")
            else:
                failed.append(label)
                _err(f"{label}: exit status {rc}, see {log}")
            print(progress.finished(seconds), flush=True)
    return done, failed, diverged


def _slug_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:120]


def cmd_sweep(args: argparse.Namespace) -> int:
    sets = _flatten_sets(args.set)
    methods = _split_list(args.methods) if args.methods else [None]
    patterns = _split_list(args.patterns) if args.patterns else [None]
    seeds = _split_list(args.seeds) if args.seeds else [None]
    grid = []
    errors: list[str] = []
    # --variant KEY=VALUE ... (repeatable): alternative override sets, e.g. ablations; 'base' = none.
    variants = [[] if group == ["base"] else group for group in (args.variant or [["base"]])]
    for variant, method, pattern, seed in itertools.product(variants, methods, patterns, seeds):
        extra = list(variant) + [f"{k}={v}" for k, v in (("method.name", method), ("method.pattern", pattern),
                                                         ("train.seed", seed)) if v is not None]
        try:
            grid.append((extra, load_config(args.config, sets + extra)))
        except ConfigError as err:
            errors.extend(e for e in err.errors if e not in errors)
    if errors:
        raise ConfigError(errors)  # nothing runs until the whole grid is valid
    out = Path(args.out)
    skipped, todo, diverged = [], [], []
    finished = finished_runs(out, (COMPLETED, DIVERGED), warn=_warn)
    for i, (extra, cfg) in enumerate(grid, 1):
        label = " ".join(extra) or "(config as is)"
        match = finished(cfg)
        if match is not None and match.status == COMPLETED:
            print(f"[{i}/{len(grid)}] skip {label}: completed in {match.path}")
            skipped.append(match.path)
        elif match is not None and not args.retry_diverged:
            print(f"[{i}/{len(grid)}] skip {label}: diverged in {match.path} (not retried: --retry-diverged "
                  f"runs it again)")
            diverged.append(label)
        elif args.dry_run:
            print(f"[{i}/{len(grid)}] would run {label}")
        else:
            todo.append((i, label, extra, cfg))
    progress = SweepProgress(len(todo), args.jobs)
    if todo:
        print(progress.line())
    if args.jobs > 1:
        done, failed, diverged_now = _sweep_in_processes(args, todo, len(grid), out, progress)
    else:
        done, failed, diverged_now = _sweep_in_process(args, todo, len(grid), out, progress)
    diverged += diverged_now
    print(f"sweep: {len(done)} run, {len(skipped)} skipped (already completed), {len(failed)} failed, "
          f"{len(diverged)} diverged")
    for label in failed:
        print(f"  failed: {label}")
    for label in diverged:
        print(f"  diverged: {label}")
    return EXIT_FAILED if failed or diverged else 0


def _sweep_in_process(args: argparse.Namespace, todo: list, total: int, out: Path,
                      progress: SweepProgress) -> tuple[list, list, list]:
    """Train the sweep's runs one after the other in this process; returns what completed, failed, diverged."""
    import time

    from .training import train

    done, failed, diverged = [], [], []
    for i, label, extra, cfg in todo:
        print(f"[{i}/{total}] run {label}")
        start = time.perf_counter()
        try:
            result = train(cfg, out_dir=out, command=args.command + ["#", *extra],
                           progress=False if args.no_progress else None)
            if result.status == DIVERGED:
                _err(f"{label}: diverged, see {result.run_dir}")
                diverged.append(label)
            else:
                done.append(result.run_dir)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the sweep
            _err(f"{label}: {type(err).__name__}: {err}")
            failed.append(label)
        print(progress.finished(time.perf_counter() - start))
    return done, failed, diverged


# --------------------------------------------------------------------------------------------------
# inspect


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
        lines.append(f"config    {c.name}: {c.data.name} / {c.model.name} / {c.method.name} {c.method.pattern} "
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
        lines.append(f"resume    bame train --resume {run.path}" if m.get("checkpoint_step") is not None
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
            _warn(f"{err} (listed as damaged)")
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


# --------------------------------------------------------------------------------------------------
# parser


def _add_optional_parser(sub: Any, name: str, module: str, adder: str, help_text: str) -> None:
    """``bame data`` / ``bame flops`` come from their modules; until a module exists, a stub says so."""
    try:
        mod = __import__(f"bame.{module}", fromlist=[adder])
        getattr(mod, adder)(sub)
    except (ImportError, AttributeError) as err:
        reason = f"{type(err).__name__}: {err}"
        p = sub.add_parser(name, help=f"{help_text} (unavailable)")

        def unavailable(args: argparse.Namespace, reason: str = reason) -> int:
            _err(f"'bame {name}' is unavailable in this installation ({reason})")
            return EXIT_USAGE

        p.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="bame", description="N:M sparse training with a sparse backward pass.")
    parser.add_argument("--version", action="version", version=f"bame {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    sub.required = True

    set_help = "override a config key, e.g. --set method.pattern=1:16 train.max_steps=100 (repeatable)"

    p = sub.add_parser("train", help="train one run (or resume one)",
                       description="Train one run into OUT/<run id>/, or continue one with --resume.")
    p.add_argument("--config", "-c", help="YAML config: a path, or a named experiment such as quick or paper/cifar10_resnet32 (configs/)")
    p.add_argument("--set", "-s", action="append", nargs="+", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--out", "-o", default="runs", help="folder of run folders (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder from its last checkpoint "
                   "(only train.max_steps and the log/eval/checkpoint cadence may change: docs/run_folders.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="a grid of runs (methods x patterns x seeds), sequentially",
                       description="One run per combination; a combination that already has a completed run "
                                   "with the same resolved config in OUT is skipped.")
    p.add_argument("--config", "-c", required=True, help="YAML config: a path, or a named experiment such as quick or paper/cifar10_resnet32 (configs/)")
    p.add_argument("--methods", help="comma-separated, e.g. bame,srste")
    p.add_argument("--patterns", help="comma-separated, e.g. 2:4,1:16")
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--set", "-s", action="append", nargs="+", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--out", "-o", default="runs", help="folder of run folders (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="list what would run and what would be skipped")
    p.add_argument("--variant", action="append", nargs="+", metavar="KEY=VALUE",
                   help="an alternative set of overrides (repeatable; 'base' = none): the grid is "
                        "variants x methods x patterns x seeds, e.g. --variant base --variant method.bame.rho=0.2")
    p.add_argument("--jobs", "-j", type=int, default=1,
                   help="runs at a time, each a subprocess with cpu_count/jobs threads (default 1: in-process)")
    p.add_argument("--retry-diverged", action="store_true",
                   help="train again the combinations whose earlier run diverged (by default they are reported, "
                        "not retried: the same config diverges again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("inspect", help="summarise a run folder (or every run in a folder)")
    p.add_argument("run_dir", nargs="+", help="a run folder, or a folder of run folders")
    p.set_defaults(func=cmd_inspect)

    _add_optional_parser(sub, "data", "data", "add_data_parser", "list and fetch data sets")
    _add_optional_parser(sub, "flops", "flops_report", "add_flops_parser", "count training FLOPs")
    _add_optional_parser(sub, "export", "export", "add_export_parser", "export a run's N:M layers compressed")
    _add_optional_parser(sub, "demo", "demo", "add_demo_parser", "the demo: BAME vs baselines on Fashion-MNIST")
    _add_optional_parser(sub, "report", "report", "add_report_parser", "tables and figures of a folder of runs")
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .resume import ResumeError
    from .runlock import RunLockedError

    types: list[type[BaseException]] = [ResumeError, RunNotFoundError, RunFolderError, RunLockedError,
                                        CheckpointError]
    try:
        from .data import DatasetCorruptError, DatasetNotFoundError

        types += [DatasetNotFoundError, DatasetCorruptError]
    except ImportError:
        pass
    return tuple(types)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    from .signals import StopRequested

    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = _command(argv)
    user_errors = _user_error_types()
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        for line in err.errors:
            _err(line)
        return EXIT_USAGE
    except user_errors as err:
        _err(str(err).strip().replace("\n", " "))
        return EXIT_USAGE
    except StopRequested as stop:
        _err(f"stopped by {stop.name} (checkpoint saved; the run is marked interrupted)")
        return stop.exit_status
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `bame flops --json | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
