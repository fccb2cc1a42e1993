"""Files a reader sees whole or not at all: atomic writes (a temporary file ``.<name>.tmp-<pid>``, then
``os.replace``), strict JSON (``null`` for a non-finite number), and the append-only CSV table of a run folder
(the header from the first row, widened when a later row brings new keys; cut back on a resume).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "strict_json",
           "remove_leftover_temp_files", "CsvTable"]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9]+$")


def remove_leftover_temp_files(run_dir: str | Path, subfolders: tuple[str, ...] = ()) -> list[str]:
    """Delete the ``.<name>.tmp-<pid>`` files a killed writer left in ``run_dir`` (and its ``subfolders``);
    call only while holding the folder's lock (then no other writer can own one).
    Returns their paths relative to ``run_dir``."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, *(run_dir / sub for sub in subfolders)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _TMP_NAME.match(p.name) and p.is_file():
                p.unlink()
                removed.append(p.relative_to(run_dir).as_posix())
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any, indent: Optional[int] = 2) -> str:
    """``obj`` as strict JSON: a non-finite float (NaN, inf) becomes ``null``, never the bare ``NaN``
    that most JSON readers reject."""
    return json.dumps(_finite_or_none(obj), indent=indent, default=_json_default, allow_nan=False)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        return _finite_or_none(obj.item())
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    import torch

    path = Path(path)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CsvTable:
    """One CSV file appended row by row; the header is the first row's keys, widened when needed."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        self.rows = 0
        self._fh: Optional[io.TextIOWrapper] = None
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.reader(f)
                self.columns = next(reader, [])
                self.rows = sum(1 for _ in reader)

    def append(self, row: Mapping[str, Any]) -> None:
        new = [str(k) for k in row if k not in self.columns]
        if new:
            self._rewrite(self.columns + new, self.rows)
        if self._fh is None:
            self._fh = open(self.path, "a", newline="")  # noqa: SIM115  (kept open across appends; close())
        csv.writer(self._fh).writerow([_cell(row.get(c)) for c in self.columns])
        self._fh.flush()
        self.rows += 1

    def _rewrite(self, columns: list[str], keep: int) -> None:
        """Stream the first ``keep`` rows into a new file with header ``columns``, then swap it in."""
        self.close()
        tmp = _tmp_path(self.path)
        with open(tmp, "w", newline="") as out:
            w = csv.writer(out)
            w.writerow(columns)
            if self.path.exists():
                with open(self.path, newline="") as f:
                    for i, r in enumerate(csv.DictReader(f)):
                        if i >= keep:
                            break
                        w.writerow([r.get(c, "") for c in columns])
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self.columns, self.rows = columns, min(self.rows, keep)

    def truncate(self, rows: int) -> int:
        """Keep the first ``rows`` data rows; returns how many were dropped."""
        dropped = max(0, self.rows - rows)
        if dropped:
            self._rewrite(self.columns, rows)
        return dropped

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
