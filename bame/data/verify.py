"""Checking a dataset on disk: the idx reader, image counts and checksums (``bame data verify``)."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .specs import CIFAR_SPECS, CIFAR_URL, IDX_SPECS, DatasetCorruptError, DatasetNotFoundError, how_to_get, refetch_hint

__all__ = ["read_idx", "verify_dataset", "check_idx_dir"]


_IDX_UINT8 = 0x08  # idx type code of unsigned bytes, the only one MNIST uses
_IDX_NDIM = {"images-idx3-ubyte": 3, "labels-idx1-ubyte": 1}


def read_idx(path: Path | str) -> np.ndarray:
    """An uncompressed idx file (big-endian header: 0, 0, type, ndim, then ndim uint32 sizes) as uint8."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an idx header")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code != _IDX_UINT8 or ndim < 1:
        hint = " (it looks gzipped: decompress it)" if raw[:2] == b"\x1f\x8b" else ""
        raise ValueError(f"{path}: not an idx file of unsigned bytes (header {raw[:4].hex()}){hint}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    payload = len(raw) - header
    if payload != math.prod(dims):
        raise ValueError(f"{path}: the header promises {'x'.join(map(str, dims))} = {math.prod(dims)} bytes "
                         f"of data, the file holds {payload} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_idx_dir(name: str, raw_dir: Path, root: Path) -> dict[str, Any]:
    """Check the four idx files in ``raw_dir`` against ``IDX_SPECS[name]``; collect every problem.
    ``root`` is the data root the error messages' commands name."""
    spec = IDX_SPECS[name]
    missing = [f for f in spec.files() if not (raw_dir / f).is_file()]
    if missing:
        raise DatasetNotFoundError(name, raw_dir, missing, how_to_get(name, root))
    problems: list[str] = []
    report: dict[str, Any] = {"name": name, "path": str(raw_dir), "counts": {}, "sha256": {}}
    for split, expected in spec.split_sizes.items():
        arrays = {}
        for kind, ndim in _IDX_NDIM.items():
            file = f"{split}-{kind}"
            try:
                arrays[kind] = array = read_idx(raw_dir / file)
            except ValueError as err:
                problems.append(str(err))
                continue
            report["counts"][file] = len(array)
            report["sha256"][file] = digest = hashlib.sha256(array.tobytes()).hexdigest()
            if array.ndim != ndim:
                problems.append(f"{file}: {array.ndim} dimensions, expected {ndim}")
            elif kind.startswith("images") and array.shape[1:] != spec.image_shape:
                problems.append(f"{file}: images of {array.shape[1:]}, expected {spec.image_shape}")
            if len(array) != expected:
                problems.append(f"{file}: {len(array)} items, expected {expected}")
            elif digest != spec.sha256[file]:
                problems.append(f"{file}: sha256 of the decoded array is {digest}, "
                                f"expected {spec.sha256[file]}")
        images, labels = arrays.get("images-idx3-ubyte"), arrays.get("labels-idx1-ubyte")
        if images is not None and labels is not None and len(images) != len(labels):
            problems.append(f"{split}: {len(images)} images but {len(labels)} labels")
        if labels is not None and labels.size and labels.max() >= spec.num_classes:
            problems.append(f"{split}-labels-idx1-ubyte: label {labels.max()} "
                            f"outside 0..{spec.num_classes - 1}")
    if problems:
        raise DatasetCorruptError(name, raw_dir, problems, refetch_hint(name, root))
    return report


def _check_cifar(name: str, root: Path) -> dict[str, Any]:
    """Check the CIFAR files against the md5s torchvision publishes for the official archive."""
    import torchvision
    from torchvision.datasets.utils import check_md5

    spec = CIFAR_SPECS[name]
    official = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / spec.folder
    md5s = dict(official.train_list + official.test_list)
    md5s[official.meta["filename"]] = official.meta["md5"]
    missing = [f for f in md5s if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(name, folder, missing, how_to_get(name, root))
    problems = [f"{file}: md5 differs from the official {md5}" for file, md5 in md5s.items()
                if not check_md5(folder / file, md5)]
    if problems:
        raise DatasetCorruptError(name, folder, problems, f"Re-extract {spec.archive} from {CIFAR_URL}.")
    return {"name": name, "path": str(folder), "md5": md5s}


def verify_dataset(name: str, root: str | Path) -> dict[str, Any]:
    """Check a dataset on disk; returns a report dict (``name``, ``path``, and checksums).

    MNIST/Fashion-MNIST: the four idx files parse, hold 60000/10000 28x28 images with as many labels
    in 0..9, and the sha256 of each decoded array matches ``IDX_SPECS``. CIFAR: the files' md5s match
    the official ones. Raises :class:`DatasetNotFoundError` (files missing) or
    :class:`DatasetCorruptError` (listing every problem found).
    """
    root = Path(root)
    if name in IDX_SPECS:
        return check_idx_dir(name, root / IDX_SPECS[name].folder / "raw", root)
    if name in CIFAR_SPECS:
        return _check_cifar(name, root)
    raise ValueError(f"cannot verify {name!r}: verification knows {list(IDX_SPECS) + list(CIFAR_SPECS)}")
