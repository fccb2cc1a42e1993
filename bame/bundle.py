"""``bame bundle RUNS_DIR [RUNS_DIR ...] OUT``: a results bundle, the compact files of finished run folders.

A bundle is small enough to commit and is read like the run folders it came from (``bame.runfolder``,
``analysis.load_runs``, ``bame inspect``). For every run folder found under a RUNS_DIR (searched
recursively), ``OUT/<name of RUNS_DIR>/<the run's path under it>/`` holds

- ``manifest.json``, ``config.yaml``, ``summary.json`` and ``DONE``, byte for byte;
- every table (``metrics``, ``flops``, ``masks``, ``adaptation``, ``sparsify``) gzip-compressed, as
  ``<table>.csv.gz`` (the readers take it for ``<table>.csv``; the same rows, byte for byte once unpacked);
- BAME's block snapshots thinned to at most ``snapshots`` per run: the first, the last and evenly spaced
  between (by their order, so the x axis of an oscillation heatmap keeps its span). The last snapshot is
  copied byte for byte (``analysis.block_summary`` reads it); the others keep every array but the blocks'
  ``last_score`` (float32 LMA scores, most of a snapshot's bytes, drawn by no figure): the oscillation
  frequency the heatmaps draw, the frozen flags, the change counts and the designated blocks. So
  ``analysis.load_blocks`` (every field) reads the last snapshot of a bundled run, and
  ``analysis.load_block_arrays(run, fields=("frequency",))`` all of them. ``adaptation.csv`` keeps every
  adaptation step (the frozen-block and oscillation-event curves).

No checkpoint (a bundled run cannot be resumed or exported), no lock. ``OUT/README.md`` names the study, the
command that wrote the bundle, the commands that produced its runs and its size; ``OUT/bundle.json`` lists
every file written with its SHA-256.

Safety: only a folder this command wrote is ever replaced, and only while every file in it is one it wrote,
unchanged (``bundle.json`` says which); the new bundle is built beside OUT and swapped in whole. Runs that are
not finished (completed, or diverged with their summary) are refused unless ``unfinished`` says to skip them
or to include them as they are.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .console import EXIT_USAGE, error, warning
from .contract import BLOCKS_DIR, COMPLETED, CONFIG, DIVERGED, DONE, MANIFEST, SUMMARY, compressed_table_file
from .runfolder import RunFolder, RunFolderError, find_run_folders

__all__ = ["INDEX", "README", "UNFINISHED_CHOICES", "BundleError", "BundleResult", "add_bundle_parser",
           "cli_bundle", "kept_snapshots", "write_bundle"]

INDEX = "bundle.json"  # every file the bundle command wrote, with its SHA-256
README = "README.md"
FORMAT = "bame.results_bundle"
FORMAT_VERSION = 1
DEFAULT_SNAPSHOTS = 12
UNFINISHED_CHOICES = ("refuse", "skip", "include")
_COPIED = (MANIFEST, CONFIG, SUMMARY, DONE)  # the small files, byte for byte
THINNED_OUT = ".last_score"  # the array left out of every kept snapshot but the last


class BundleError(ValueError):
    """The bundle cannot be written as asked; the message says what to change."""


@dataclass
class BundledRun:
    """One run folder as bundled: where it came from and went, and what of its block state was kept."""

    source: Path
    dest: str  # relative to the bundle
    status: str
    snapshots_total: int = 0
    snapshots_kept: int = 0


@dataclass
class BundleResult:
    out: Path
    runs: list[BundledRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unfinished runs left out
    files: int = 0
    bytes: int = 0  # the runs' files (README.md and bundle.json aside)


# --------------------------------------------------------------------------------------------------
# what is kept


def kept_snapshots(count: int, limit: int) -> list[int]:
    """Indices (into ``count`` snapshots in step order) of the at most ``limit`` kept: the first, the last and
    evenly spaced between (rounded), so that thinning keeps the span of the adaptation steps."""
    if limit < 0:
        raise ValueError(f"the snapshot limit must be >= 0, got {limit}")
    if count <= limit:
        return list(range(count))
    if limit == 0:
        return []
    if limit == 1:
        return [count - 1]  # the last: what the run ended with
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _finished(folder: RunFolder) -> bool:
    status = folder.status  # a diverged run ended too, and keeps its summary for the record
    return (status == COMPLETED and folder.done) or (status == DIVERGED and folder.summary is not None)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)  # no timestamp: the same table, the same bytes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bundle_run(folder: RunFolder, dest: Path, snapshots: int) -> BundledRun:
    dest.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        if (folder.path / name).is_file():
            shutil.copyfile(folder.path / name, dest / name)
    for table in folder.tables():
        path = folder.table_path(table)
        data = path.read_bytes()
        (dest / compressed_table_file(table)).write_bytes(data if path.suffix == ".gz" else _gzip(data))
    found = folder.block_snapshots()
    keep = kept_snapshots(len(found), snapshots)
    if keep:
        (dest / BLOCKS_DIR).mkdir()
        for i in keep:
            path = found[i][1]
            if i == len(found) - 1:
                shutil.copyfile(path, dest / BLOCKS_DIR / path.name)
            else:
                _thin_snapshot(path, dest / BLOCKS_DIR / path.name)
    return BundledRun(folder.path, "", folder.status, len(found), len(keep))


def _thin_snapshot(src: Path, dst: Path) -> None:
    """``src`` without its blocks' scores (``<layer>.last_score``), every other array as it was."""
    import numpy as np

    try:
        with np.load(src) as z:
            arrays = {k: z[k] for k in z.files if not k.endswith(THINNED_OUT)}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise BundleError(f"{src} is damaged ({err}): bame writes it whole or not at all; restore it from a copy, "
                          f"or bundle with --snapshots 0") from None
    np.savez_compressed(dst, **arrays)  # no timestamps: the same arrays, the same bytes


# --------------------------------------------------------------------------------------------------
# checks before anything is written


def _sources(runs_dirs: list[Path], out: Path) -> dict[str, Path]:
    """``{name in the bundle: RUNS_DIR}``; refuses missing folders, two of one name, and OUT inside one."""
    named: dict[str, Path] = {}
    for d in runs_dirs:
        if not d.is_dir():
            raise BundleError(f"{str(d)!r} is not a folder of runs (it does not exist or is a file)")
        name = d.resolve().name
        if name in named:
            raise BundleError(f"{str(named[name])!r} and {str(d)!r} would both be bundled as {name}/: "
                              f"bundle folders of different names")
        real, out_real = d.resolve(), out.resolve()
        if out_real == real or real in out_real.parents:
            raise BundleError(f"OUT {str(out)!r} lies inside the runs folder {str(d)!r}: the next bundle of that "
                              f"folder would hold this one; write the bundle elsewhere")
        if out_real in real.parents:
            raise BundleError(f"the runs folder {str(d)!r} lies inside OUT {str(out)!r}: write the bundle elsewhere")
        named[name] = d
    return named


def _previous_files(out: Path) -> dict[str, str]:
    """The files (relative path -> SHA-256) of the bundle at ``out``, after checking that every file there is
    one this command wrote, unchanged; {} for a missing or empty folder."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"OUT {str(out)!r} is a file: give a folder for the bundle")
    present = sorted(p for p in out.rglob("*") if not p.is_dir()) if out.exists() else []
    if not present:
        return {}
    try:
        index = json.loads((out / INDEX).read_text())
        written = dict(index["files"]) if index.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        written = None
    if written is None:
        raise BundleError(f"OUT {str(out)!r} holds files and no {INDEX} of bame bundle: it was not written by "
                          f"bame bundle; choose another OUT or move its files away")
    foreign = [p.relative_to(out).as_posix() for p in present
               if p.relative_to(out).as_posix() not in written and p.relative_to(out).as_posix() != INDEX]
    changed = [rel for rel, sha in written.items() if (out / rel).is_file() and _sha256(out / rel) != sha]
    for problem, names in (("not written by bame bundle", foreign), ("changed since bame bundle wrote them", changed)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise BundleError(f"OUT {str(out)!r} holds files {problem} ({', '.join(names[:3])}{more}): nothing a "
                              f"user made is replaced; move them away (or choose another OUT) and bundle again")
    return written


def _select(sources: dict[str, Path], unfinished: str) -> tuple[list[tuple[RunFolder, str]], list[str]]:
    """The run folders to bundle with their place in the bundle, and the unfinished ones left out."""
    chosen, left = [], []
    for name, d in sources.items():
        folders = find_run_folders(d)
        if not folders:
            raise BundleError(f"{str(d)!r} holds no run folder (a folder with manifest.json)")
        for path in folders:
            folder = RunFolder(path)
            try:
                finished = _finished(folder)
            except RunFolderError:
                finished = False  # a damaged manifest or summary: not a finished run
            rel = Path(name) / path.relative_to(d)
            if finished or unfinished == "include":
                chosen.append((folder, rel.as_posix()))
            else:
                left.append(str(path))
    if left and unfinished == "refuse":
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise BundleError(f"{len(left)} run folder(s) are not finished ({', '.join(left[:3])}{more}): wait for them, "
                          f"or pass --unfinished skip to leave them out (or include, to bundle them as they are)")
    if not chosen:
        raise BundleError("no finished run to bundle (--unfinished include bundles unfinished ones as they are)")
    return chosen, left


# --------------------------------------------------------------------------------------------------
# the index and the README


def _command_line(argv: Any) -> tuple[str, str]:
    """A run's command as a shell reads it, split at a sweep's ``#`` into the command and the run's label."""
    argv = [str(a) for a in argv or []]
    if "#" in argv:
        i = argv.index("#")
        return shlex.join(argv[:i]), " ".join(argv[i + 1:])
    return (shlex.join(argv) if argv else "(not recorded)"), ""


def _run_line(run: BundledRun, root: Path) -> str:
    folder = RunFolder(root / run.dest)
    summary = folder.summary or {}
    acc = (summary.get("final") or {}).get("test_acc")
    top1 = f"{100 * acc:.2f}" if isinstance(acc, (int, float)) else "–"
    _, label = _command_line(folder.manifest.get("command"))
    blocks = f"{run.snapshots_kept} of {run.snapshots_total}" if run.snapshots_total else "–"
    return f"| `{run.dest}` | {run.status} | {summary.get('steps', '–')} | {top1} | {blocks} | {label or '–'} |"


def _readme(title: str, command: str, result: BundleResult, sources: dict[str, Path], snapshots: int,
            root: Path, shown: Path) -> str:
    """The bundle's README, from the bundled files at ``root``; ``shown`` is where the bundle will be."""
    thinned = sum(r.snapshots_kept < r.snapshots_total for r in result.runs)
    lines = [f"# {title}", "",
             "A results bundle written by `bame bundle` (bame/bundle.py): the compact files of the run folders "
             "below, read like run folders by `analysis` and `bame inspect`. Do not edit it: regenerate it.", "",
             f"- **Size**: {result.bytes / 1e6:.2f} MB in {result.files} files (the runs' files; this README and "
             f"{INDEX} aside).",
             f"- **Written by**: `{command}`",
             f"- **Runs**: {len(result.runs)}"
             + (f"; {len(result.skipped)} unfinished run(s) left out" if result.skipped else "")
             + ". Sources: " + ", ".join(f"`{n}/` from `{d}`" for n, d in sources.items()) + ".",
             f"- **Per run**: {', '.join(_COPIED)} byte for byte; every table as `<table>.csv.gz` (gzip; the readers "
             "take it for `<table>.csv`); no checkpoint.",
             f"- **Block snapshots** (`blocks/step_*.npz`, BAME's per-block state): at most {snapshots} per run, "
             f"the first, the last and evenly spaced between; {thinned} run(s) had more and were thinned. The last "
             "is copied byte for byte; the others keep the oscillation frequency, frozen flags, change counts and "
             "designated blocks, not the blocks' scores (`last_score`, drawn by no figure). `adaptation.csv.gz` "
             "keeps every adaptation step (the frozen-block and oscillation-event curves).", "",
             "```python", "import analysis",
             f"runs = analysis.load_runs({(shown / next(iter(sources))).as_posix()!r})  "
             "# one row per run, as for a folder of runs",
             "```", ""]
    lines += ["## The commands that produced the runs", ""]
    for name in sources:
        counts = Counter(_command_line(RunFolder(root / r.dest).manifest.get("command"))[0]
                         for r in result.runs if r.dest.split("/")[0] == name)
        lines.append(f"`{name}/`:")
        lines.append("")
        lines += [f"- {n} run(s): `{cmd}`" for cmd, n in sorted(counts.items())]
        lines.append("")
    lines += ["## Runs", "",
              "The label is what the sweep set for the run (after its command's `#`).", "",
              "| run | status | steps | top-1 (%) | block snapshots kept | label |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    lines += [_run_line(r, root) for r in result.runs]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the command


def write_bundle(runs_dirs: list[str | Path], out: str | Path, *, title: Optional[str] = None,
                 unfinished: str = "refuse", snapshots: int = DEFAULT_SNAPSHOTS,
                 command: Optional[list[str]] = None) -> BundleResult:
    """Bundle the run folders under ``runs_dirs`` into ``out`` (see the module docstring); returns what was
    bundled. Raises :class:`BundleError`, before anything is written, when the bundle cannot be written as asked."""
    if unfinished not in UNFINISHED_CHOICES:
        raise BundleError(f"unfinished must be one of {', '.join(UNFINISHED_CHOICES)}, not {unfinished!r}")
    if snapshots < 0:
        raise BundleError(f"--snapshots must be >= 0 (block snapshots kept per run), got {snapshots}")
    out = Path(out)
    sources = _sources([Path(d) for d in runs_dirs], out)
    _previous_files(out)
    chosen, left = _select(sources, unfinished)
    title = title or f"Runs of {', '.join(sources)}"
    command_text = shlex.join(command) if command else "(the Python API: bame.bundle.write_bundle)"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = BundleResult(out, skipped=left)
        for folder, rel in chosen:
            run = _bundle_run(folder, tmp / rel, snapshots)
            run.dest = rel
            result.runs.append(run)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        result.files, result.bytes = len(files), sum(p.stat().st_size for p in files)
        (tmp / README).write_text(_readme(title, command_text, result, sources, snapshots, tmp, out))
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "title": title, "command": command_text,
                 "sources": {n: str(d) for n, d in sources.items()}, "snapshots_per_run": snapshots,
                 "unfinished": unfinished, "skipped": left, "bytes": result.bytes,
                 "runs": [{"path": r.dest, "status": r.status, "snapshots_total": r.snapshots_total,
                           "snapshots_kept": r.snapshots_kept} for r in result.runs],
                 "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        _previous_files(out)  # still only what this command wrote: nothing changed it while we read the runs
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return result


def add_bundle_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bundle`` to a ``bame`` sub-command parser; sets ``func=cli_bundle``."""
    p = subparsers.add_parser("bundle", help="the compact files of finished run folders, as a results bundle to commit",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="RUNS_DIR ... OUT",
                   help="one or more folders of run folders (searched recursively; each becomes OUT/<its name>/), "
                        "then the bundle's folder")
    p.add_argument("--title", help="the study's name, the README's title (default: 'Runs of <folders>')")
    p.add_argument("--unfinished", choices=UNFINISHED_CHOICES, default="refuse",
                   help="runs not finished (running, interrupted, failed): refuse to bundle (default), skip them, "
                        "or include them as they are")
    p.add_argument("--snapshots", type=int, default=DEFAULT_SNAPSHOTS, metavar="N",
                   help=f"block snapshots kept per run: the first, the last and evenly spaced between "
                        f"(default {DEFAULT_SNAPSHOTS})")
    p.set_defaults(func=cli_bundle)
    return p


def cli_bundle(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        error("bame bundle needs a folder of runs and the bundle's folder: bame bundle RUNS_DIR [RUNS_DIR ...] OUT")
        return EXIT_USAGE
    try:
        result = write_bundle(args.paths[:-1], args.paths[-1], title=args.title, unfinished=args.unfinished,
                              snapshots=args.snapshots, command=getattr(args, "command", None))
    except BundleError as err:
        error(str(err))
        return EXIT_USAGE
    if result.skipped:
        warning(f"{len(result.skipped)} unfinished run(s) left out (--unfinished skip)")
    print(f"{result.out}: {len(result.runs)} runs, {result.files} files, {result.bytes / 1e6:.2f} MB "
          f"(README.md and {INDEX} aside)")
    return 0
