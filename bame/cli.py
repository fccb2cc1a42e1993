"""The ``bame`` command line: ``train`` here, and the commands whose modules add their parsers.

::

    bame train --config configs/quick.yaml [--set method.pattern=1:16 ...] [--out runs]
    bame train --resume runs/<id> [--set train.max_steps=N]
    bame sweep --config FILE --methods bame,srste --patterns 2:4,1:16 --seeds 0,1,2 [--out runs]  (bame.sweep)
    bame inspect runs/<id>        (bame.inspect_runs; a folder of runs: one line each)
    bame data ...                  (bame.data.cli)
    bame flops ...                 (bame.flops_report)
    bame export RUN_DIR            (bame.export)
    bame demo                      (bame.demo)
    bame report DIR [--out FILE]   (bame.report: tables, figures and commands of a folder of runs)
    bame bundle RUNS_DIR... OUT    (bame.bundle: the compact files of finished runs, to commit)

User mistakes (a missing file, a bad key or pattern, a data set not on disk, a missing, locked or
damaged run folder, an unsafe checkpoint) print one line per problem and exit with status 2, without a
traceback. The exit statuses are bame.console's: 0 ok; 1 a sweep run failed or diverged; 2 a user mistake;
3 the run diverged; 128 + N a run stopped by signal N at the end of a step, with a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from . import bundle, data, demo, export, flops_report, inspect_runs, report, sweep
from .config import ConfigError, load_config
from .console import EXIT_BROKEN_PIPE, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, error
from .contract import DIVERGED
from .runs import RunFolderError, RunNotFoundError, load_run

__all__ = ["main", "build_parser"]


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

    sets = [item for group in (args.set or []) for item in group]
    progress = False if args.no_progress else None
    if args.resume is not None:
        cfg = load_config(args.config, sets) if args.config is not None else None
        result = train(cfg, resume=args.resume, overrides=None if cfg is not None else sets,
                       command=args.command, progress=progress)
    else:
        if args.config is None:
            error("bame train needs --config FILE (or --resume RUN_DIR)")
            return EXIT_USAGE
        cfg = load_config(args.config, sets)
        result = train(cfg, out_dir=args.out, command=args.command, progress=progress)
    if result.run_dir is not None:
        print(result.run_dir)
    if result.status == DIVERGED:
        error(_diverged_message(result))
        return EXIT_DIVERGED
    return 0


def _diverged_message(result: Any) -> str:
    """The manifest's account of a diverged run (an extension's is in its resume entry)."""
    if result.run_dir is None:
        return "the run diverged (see rank 0's run folder)"
    m = load_run(result.run_dir).manifest
    return f"run {result.run_id} {m.get('error') or (m.get('resumes') or [{}])[-1].get('error')}"


# --------------------------------------------------------------------------------------------------
# parser


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

    sweep.add_sweep_parser(sub, set_help)
    inspect_runs.add_inspect_parser(sub)
    data.add_data_parser(sub)
    flops_report.add_flops_parser(sub)
    export.add_export_parser(sub)
    demo.add_demo_parser(sub)
    report.add_report_parser(sub)
    bundle.add_bundle_parser(sub)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .resume import ResumeError
    from .runlock import RunLockedError

    types: list[type[BaseException]] = [ResumeError, RunNotFoundError, RunFolderError, RunLockedError,
                                        CheckpointError]
    return tuple(types + [data.DatasetNotFoundError, data.DatasetCorruptError])


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
            error(line)
        return EXIT_USAGE
    except user_errors as err:
        error(str(err).strip().replace("\n", " "))
        return EXIT_USAGE
    except StopRequested as stop:
        error(f"stopped by {stop.name} (checkpoint saved; the run is marked interrupted)")
        return stop.exit_status
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `bame flops --json | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
