"""``bame demo``: BAME against the dense-backward baselines on real data, in one command.

Trains the runs of :data:`DEMO_RUNS` from ``configs/demo.yaml`` (Fashion-MNIST padded to 32x32, CIFAR
ResNet-20, a short schedule) into ``OUT`` (default ``runs/demo``), then writes ``OUT/report.md`` with
the comparison table and figures and prints the table. A run that already completed with the same
resolved config is reused, so running the demo again only rebuilds the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from .config import Config, load_config

# (label, overrides): what the demo compares. 1:4 for every method, and BAME at 1:16 too.
DEMO_RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dense", ("method.name=dense",)),
    ("static 1:4", ("method.name=static", "method.pattern=1:4")),
    ("srste 1:4", ("method.name=srste", "method.pattern=1:4")),
    ("bame 1:4", ("method.name=bame", "method.pattern=1:4")),
    ("bame 1:16", ("method.name=bame", "method.pattern=1:16")),
)
DEFAULT_CONFIG = "demo"  # the named experiment configs/demo.yaml (packaged with the wheel too)


def demo_configs(config: str | Path, root: Optional[str], extra: list[str]) -> list[tuple[str, Config]]:
    """The resolved config of each demo run (``root`` overrides ``data.root``)."""
    base = [f"data.root={root}"] if root else []
    return [(label, load_config(config, base + list(sets) + extra)) for label, sets in DEMO_RUNS]


def run_demo(out: Path, config: str | Path = DEFAULT_CONFIG, root: Optional[str] = None,
             extra: Optional[list[str]] = None, progress: Optional[bool] = None) -> Path:
    """Train (or reuse) every demo run under ``out``, write ``out/report.md``; returns its path."""
    from analysis import load_runs, paper_table, to_markdown

    from .report import write_report
    from .sweep import completed_runs
    from .training import train

    runs = demo_configs(config, root, extra or [])  # every config is validated before anything runs
    start = time.perf_counter()
    completed = completed_runs(out)
    for i, (label, cfg) in enumerate(runs, 1):
        done = completed(cfg)
        if done is not None:
            print(f"[demo {i}/{len(runs)}] {label}: reusing {done.path}")
            continue
        print(f"[demo {i}/{len(runs)}] {label}: training ({time.perf_counter() - start:.0f}s elapsed)")
        train(cfg, out_dir=out, command=[*sys.argv, "#", label], progress=progress)
    report = write_report(out, out / "report.md", title="bame demo: BAME vs dense-backward baselines on Fashion-MNIST")
    table = paper_table(load_runs(out))
    print()
    print(to_markdown(table))
    print(f"report: {report}  ({time.perf_counter() - start:.0f}s)")
    return report


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train BAME and the baselines on Fashion-MNIST, write a report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", "-o", default="runs/demo", help="folder for the runs and report.md")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="base config: a path or a named experiment (default: demo, i.e. configs/demo.yaml)")
    p.add_argument("--root", help="data root (default: the config's data.root)")
    p.add_argument("--set", "-s", action="append", nargs="+", metavar="KEY=VALUE",
                   help="override a key for every demo run, e.g. train.epochs=5")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cli_demo)
    return p


def cli_demo(args: argparse.Namespace) -> int:
    extra = [item for group in (args.set or []) for item in group]
    run_demo(Path(args.out), args.config, args.root, extra, progress=False if args.no_progress else None)
    return 0
