"""Sparsity methods behind one interface (``base.py``). Every other module of this package is one method,
which registers itself (``@register``) when the package imports it: importing the package imports each of
its modules, in name order, so adding a method is adding its file (docs/adding_a_method.md)."""

import importlib
import pkgutil

from .base import (METHOD_SECTIONS, METHODS, AdaptationRecord, FlopsBudget, GradientSegment, LayerAdaptation,
                   Method, MethodCommon, MethodContext, available_methods, create_method, register)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "METHOD_SECTIONS", "AdaptationRecord", "FlopsBudget", "GradientSegment", "LayerAdaptation",
           "Method", "MethodCommon", "MethodContext", "available_methods", "create_method", "register"]
