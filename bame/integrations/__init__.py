"""bame inside other training frameworks: ``bame.integrations.lightning.Sparsify`` (PyTorch Lightning).

Each integration is a module that imports its framework when it is first used (``bame.integrations.lightning``
needs the ``lightning`` extra: ``pip install 'bame[lightning]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["lightning"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
