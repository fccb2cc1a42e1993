"""``bame data get | verify`` (wired into ``bame`` by bame/cli.py)."""

from __future__ import annotations

import argparse

from .fetch import get_dataset
from .specs import CIFAR_SPECS, FETCHABLE, DataConfig
from .verify import verify_dataset

__all__ = ["add_data_parser", "cli_data_get", "cli_data_verify"]


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data get NAME [--root DIR]`` and ``data verify NAME [--root DIR]`` to ``subparsers``.

    Each leaf parser sets ``func`` to its handler (``args.func(args)`` returns an exit code).
    """
    data = subparsers.add_parser("data", help="fetch and verify datasets")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="{get,verify}")
    default_root = DataConfig().root
    get = actions.add_parser("get", help=f"fetch {' or '.join(FETCHABLE)} into ROOT and verify it")
    get.add_argument("name", choices=FETCHABLE)
    get.add_argument("--root", default=default_root, help=f"data folder (default: {default_root})")
    get.set_defaults(func=cli_data_get)
    verify = actions.add_parser("verify", help="check a dataset on disk (counts and checksums)")
    verify.add_argument("name", choices=FETCHABLE + tuple(CIFAR_SPECS))
    verify.add_argument("--root", default=default_root, help=f"data folder (default: {default_root})")
    verify.set_defaults(func=cli_data_verify)
    return data


def cli_data_get(args: argparse.Namespace) -> int:
    """``bame data get NAME --root DIR``; errors propagate with messages written for the user."""
    get_dataset(args.name, args.root)
    return 0


def cli_data_verify(args: argparse.Namespace) -> int:
    """``bame data verify NAME --root DIR``: prints what was checked; errors propagate."""
    report = verify_dataset(args.name, args.root)
    print(f"{args.name}: OK in {report['path']}")
    for file, count in report.get("counts", {}).items():
        print(f"  {file}: {count} items, sha256 {report['sha256'][file]}")
    return 0
