"""``bame sweep``: a grid of runs (variants x methods x patterns x seeds), in this process or ``--jobs``
subprocesses at a time; a combination that already has a completed run of the same experiment in ``OUT``
is skipped, and one whose run diverged is reported, not retried (``--retry-diverged`` retries it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError, dump_yaml, experiment_identity, load_config
from .console import EXIT_DIVERGED, EXIT_FAILED, error, warning
from .contract import COMPLETED, DIVERGED
from .progress import SweepProgress
from .runs import RunFolderError, RunReader, find_runs

__all__ = ["add_sweep_parser", "cmd_sweep", "finished_runs", "completed_runs"]


def add_sweep_parser(sub: argparse._SubParsersAction, set_help: str) -> argparse.ArgumentParser:
    """Add ``sweep`` to a ``bame`` sub-command parser; sets ``func=cmd_sweep``."""
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
    return p


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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
                error(f"{label}: diverged, see {log}")
            else:
                failed.append(label)
                error(f"{label}: exit status {rc}, see {log}")
            print(progress.finished(seconds), flush=True)
    return done, failed, diverged


def _slug_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:120]


def cmd_sweep(args: argparse.Namespace) -> int:
    sets = [item for group in (args.set or []) for item in group]
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
    finished = finished_runs(out, (COMPLETED, DIVERGED), warn=warning)
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
                error(f"{label}: diverged, see {result.run_dir}")
                diverged.append(label)
            else:
                done.append(result.run_dir)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the sweep
            error(f"{label}: {type(err).__name__}: {err}")
            failed.append(label)
        print(progress.finished(time.perf_counter() - start))
    return done, failed, diverged
