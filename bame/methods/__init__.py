"""Sparsity methods behind one interface; importing this package fills the registry."""

from . import asp, bame, dense, phased, srste, static, ste  # noqa: F401  (each module registers its method)
from .base import (METHODS, AdaptationRecord, LayerAdaptation, Method, MethodContext, available_methods,
                   create_method, experiment_identity, register)

__all__ = ["METHODS", "AdaptationRecord", "LayerAdaptation", "Method", "MethodContext", "available_methods",
           "create_method", "experiment_identity", "register"]
