"""bame: N:M sparse training with a sparse backward pass (BAME and the dense-backward baselines).

Top-level conveniences::

    import bame
    cfg = bame.load_config("configs/quick.yaml", ["method.pattern=1:16"])
    result = bame.train(cfg, out_dir="runs")        # or bame.train("configs/quick.yaml")
    sp = bame.attach(model, optimizer, method="bame", pattern="1:16", total_steps=n)  # a loop of your own
    run = bame.load_run(result.run_dir)             # manifest, config, tables as DataFrames

The command line is ``bame`` / ``python -m bame`` (see ``bame --help``). The layers of the package, from
the run-folder contract up to the commands, are drawn in docs/architecture.md.

This face imports what it names on first use, so that ``import bame.contract`` (the names a run folder's
readers share, e.g. ``analysis``) does not import torch; a submodule is reached as ``bame.<name>`` too.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_NAMES = {"Config": "config", "ConfigError": "config", "load_config": "config", "RunReader": "runs",
          "find_runs": "runs", "load_run": "runs", "RunResult": "training", "train": "training",
          "attach": "sparsifier", "Sparsifier": "sparsifier"}

__all__ = ["__version__", *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists and an import inside it failed
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
