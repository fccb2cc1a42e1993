"""The one reader of run folders: the files of ``bame.contract``, as written, without torch.

:class:`RunFolder` is a read-only view of one folder: its manifest, its config as written (a mapping),
its summary, its tables (rows of strings, or a pandas DataFrame with the contract's columns when a table is
absent), BAME's block snapshots, the N:M pattern its masks follow, and who is writing it. ``analysis``,
``bame export`` and ``bame inspect`` read through it; ``bame.runs.RunReader`` adds the typed config and the
checkpoint. A damaged file raises :class:`RunFolderError` naming it (bame writes every file whole or not
at all), a path that is no run folder :class:`RunNotFoundError`.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Optional

from .contract import (BLOCKS_DIR, CHECKPOINT, CONFIG, DONE, MANIFEST, RUNNING, SPARSIFY_TABLE, SUMMARY,
                       TABLE_COLUMNS, block_step, compressed_table_file, table_file)
from .pattern import Layout, NMPattern
from .runlock import lock_holder

__all__ = ["RunFolder", "RunNotFoundError", "RunFolderError", "find_runs", "find_run_folders"]


class RunNotFoundError(FileNotFoundError):
    """A path that is not a run folder (no ``manifest.json``)."""


class RunFolderError(ValueError):
    """A run folder (or the folder of runs) that cannot be used as asked: a damaged file, not writable."""


class RunFolder:
    """Read-only view of one run folder (see the module docstring).

    ``need_manifest=False`` opens a folder that lacks ``manifest.json`` too (``bame export`` of a folder
    holding only a config and a checkpoint); its :attr:`manifest` then raises :class:`RunFolderError`.
    """

    def __init__(self, path: str | Path, *, need_manifest: bool = True):
        self.path = Path(path)
        if need_manifest and not (self.path / MANIFEST).is_file():
            what = "does not exist" if not self.path.exists() else "is not a run folder (no manifest.json)"
            raise RunNotFoundError(f"{self.path}: {what}")

    @property
    def id(self) -> str:
        return self.path.name

    # -- files ---------------------------------------------------------------------------------------
    def _damaged(self, name: str, problem: str) -> RunFolderError:
        return RunFolderError(f"{self.path / name} is damaged ({problem}): bame writes it whole or not at all, "
                              f"so it was edited or cut by hand; restore it from a copy, or remove the run folder")

    def _json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise RunFolderError(f"{self.path / name} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._damaged(name, f"not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise self._damaged(name, f"a JSON {type(data).__name__}, not an object")
        return data

    @property
    def manifest(self) -> dict[str, Any]:
        return self._json(MANIFEST)

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def done(self) -> bool:
        return (self.path / DONE).exists()

    @property
    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    @property
    def config_dict(self) -> dict[str, Any]:
        """``config.yaml`` as written: a mapping of sections (patterns as text)."""
        import yaml

        try:
            data = yaml.safe_load((self.path / CONFIG).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise self._damaged(CONFIG, f"not valid YAML: {' '.join(str(err).split())}") from None
        except FileNotFoundError:
            raise RunFolderError(f"{self.path / CONFIG} is missing: a run folder holds its resolved config; "
                                 f"restore it from a copy") from None
        if not isinstance(data, dict):
            raise self._damaged(CONFIG, f"a YAML {type(data).__name__}, not a mapping of sections")
        return data

    @property
    def summary(self) -> Optional[dict[str, Any]]:
        return self._json(SUMMARY) if (self.path / SUMMARY).exists() else None

    @property
    def checkpoint_path(self) -> Optional[Path]:
        p = self.path / CHECKPOINT
        return p if p.exists() else None

    def nm_pattern(self) -> tuple[NMPattern, Layout]:
        """The pattern and layout the run's masks follow, from ``config.yaml`` as written (not through the
        config schema, so that a folder of an older bame still reads)."""
        path = self.path / CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a run folder holds its resolved config.yaml "
                                    f"(needed for method.pattern and method.layout)")
        method = self.config_dict.get("method")
        if not isinstance(method, dict) or "pattern" not in method:
            raise ValueError(f"{path}: no method.pattern: cannot tell which N:M pattern the masks follow")
        try:
            return NMPattern.parse(method["pattern"]), Layout.parse(method.get("layout", Layout.ROW.value))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def layer_patterns(self) -> dict[str, NMPattern]:
        """Each N:M layer's own pattern, from ``sparsify.csv`` (``{}`` for a folder written before the table
        had a ``pattern`` column: its layers all follow :meth:`nm_pattern`)."""
        out = {}
        for row in self.rows(SPARSIFY_TABLE):
            if row.get("sparse") == "True" and row.get("pattern"):
                try:
                    out[row["name"]] = NMPattern.parse(row["pattern"])
                except ValueError as err:
                    raise self._damaged(table_file(SPARSIFY_TABLE), f"layer {row['name']!r}: {err}") from None
        return out

    # -- who writes it -------------------------------------------------------------------------------
    def writing_pid(self) -> Optional[int]:
        """The pid the manifest names as writing this folder now (status running, or an extension of a
        completed run still running), else None. Whether that process lives: :meth:`lock_holder`."""
        m = self.manifest
        resumes = m.get("resumes") or []
        last = resumes[-1] if resumes else m
        running = m.get("status") == RUNNING or (bool(resumes) and last.get("status") == RUNNING)
        pid = last.get("pid", m.get("pid"))
        return int(pid) if running and pid else None

    def lock_holder(self) -> Optional[str]:
        """``'process N'`` when a live process holds the folder's lock (is writing it), else None."""
        return lock_holder(self.path)

    def stale_pid(self) -> Optional[int]:
        """The recorded writer's pid when the manifest says ``running`` but no process holds the lock
        (the writer was killed, or its machine went down): the run can be resumed."""
        pid = self.writing_pid()
        return pid if pid is not None and self.lock_holder() is None else None

    # -- tables and arrays -----------------------------------------------------------------------------
    def tables(self) -> list[str]:
        """The names of the tables the folder holds (``<name>.csv``, or ``<name>.csv.gz`` in a results bundle)."""
        found = [p.name for p in self.path.iterdir() if p.is_file()] if self.path.is_dir() else []
        return sorted({n.removesuffix(".gz").removesuffix(".csv") for n in found if n.endswith((".csv", ".csv.gz"))})

    def table_path(self, name: str) -> Optional[Path]:
        """The file of table ``name``: ``<name>.csv``, else its compressed copy ``<name>.csv.gz`` (bame bundle
        stores tables so); None when the folder has neither."""
        for file in (table_file(name), compressed_table_file(name)):
            if (self.path / file).is_file():
                return self.path / file
        return None

    def rows(self, name: str) -> list[dict[str, str]]:
        """``<name>.csv`` as a list of dicts of strings (no pandas needed); [] when absent."""
        path = self.table_path(name)
        if path is None:
            return []
        with (gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")) as f:
            return list(csv.DictReader(f))

    def table(self, name: str):
        """``<name>.csv`` as a pandas DataFrame; when absent or empty, an empty one with the contract's
        columns (``bame.contract.TABLE_COLUMNS``), so that callers can filter and group without special cases."""
        import pandas as pd

        path = self.table_path(name)
        if path is not None and path.stat().st_size:
            try:
                return pd.read_csv(path)
            except pd.errors.EmptyDataError:
                pass
        return pd.DataFrame({c: pd.Series(dtype=float) for c in TABLE_COLUMNS.get(name, ())})

    def block_snapshots(self) -> list[tuple[int, Path]]:
        """BAME's block snapshots ``blocks/step_*.npz`` as ``(step, path)``, by step."""
        folder = self.path / BLOCKS_DIR
        if not folder.is_dir():
            return []
        found = [(block_step(p.name), p) for p in folder.iterdir()]
        return sorted((step, p) for step, p in found if step is not None)

    def arrays(self, name: str) -> dict[str, Any]:
        """``blocks/<name>.npz`` as numpy arrays."""
        import numpy as np

        with np.load(self.path / BLOCKS_DIR / f"{name}.npz") as z:
            return {k: z[k] for k in z.files}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def find_runs(out_dir: str | Path, reader: type[RunFolder] = RunFolder) -> list[RunFolder]:
    """Every run folder directly under ``out_dir``, sorted by id (oldest first), opened with ``reader``."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return [reader(p) for p in sorted(out.iterdir()) if (p / MANIFEST).is_file()]


def find_run_folders(root: str | Path) -> list[Path]:
    """Every run folder (a directory with ``manifest.json``) under ``root``, ``root`` included, sorted.

    The search does not descend into a run folder (its ``blocks/`` and ``checkpoints/`` hold no runs).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"runs root {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"runs root {str(root)!r} is not a directory")
    found: list[Path] = []
    stack = [root]
    while stack:
        d = stack.pop()
        if (d / MANIFEST).is_file():
            found.append(d)
            continue
        stack.extend(sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            reverse=True))
    return sorted(found)
