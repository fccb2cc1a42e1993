"""The model zoo: a registry of constructors, ``create`` and ``available``.

Every constructor takes ``num_classes`` and ``in_channels`` (MNIST has 1 channel) and returns an
``nn.Module`` whose first ``nn.Conv2d`` is the stem and whose last registered ``nn.Linear`` is the
classifier: ``bame.layers.sparsify`` keeps both dense, so each model file keeps that order.

A model family is one file of this package that decorates its constructors with ``@register(name)``
(``registry.py``): importing the package imports each of its modules, in name order, so adding a family is
adding its file.
"""

import importlib
import pkgutil

from .registry import MODELS, SIZED, available, create, init_weights, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["MODELS", "SIZED", "available", "create", "init_weights", "register"]
