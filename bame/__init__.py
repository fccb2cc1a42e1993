"""bame: N:M sparse training with a sparse backward pass (BAME and the dense-backward baselines).

Top-level conveniences::

    import bame
    cfg = bame.load_config("configs/quick.yaml", ["method.pattern=1:16"])
    result = bame.train(cfg, out_dir="runs")        # or bame.train("configs/quick.yaml")
    run = bame.load_run(result.run_dir)             # manifest, config, tables as DataFrames

The command line is ``bame`` / ``python -m bame`` (see ``bame --help``).
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .runs import RunReader, find_runs, load_run  # noqa: E402
from .train import RunResult, train  # noqa: E402  (the function shadows the submodule name on purpose)

__all__ = ["__version__", "Config", "ConfigError", "load_config", "RunReader", "find_runs", "load_run",
           "RunResult", "train"]
