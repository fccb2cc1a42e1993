"""Sparsity methods behind one interface; importing this package fills the registry."""

from .base import (METHODS, AdaptationRecord, LayerAdaptation, Method, MethodContext, available_methods,
                   create_method, register)

__all__ = ["METHODS", "AdaptationRecord", "LayerAdaptation", "Method", "MethodContext", "available_methods",
           "create_method", "register"]
