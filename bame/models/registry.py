"""The model registry: ``register`` (a decorator), ``create``, ``available`` and the shared ``init_weights``.

Every constructor takes ``num_classes`` and ``in_channels`` and returns an ``nn.Module`` whose first
``nn.Conv2d`` is the stem (a ViT's patch embedding) and whose last registered ``nn.Linear`` is the classifier
(``bame.models``). A model whose parameters depend on the input size (a ViT's position embedding has one entry
per patch) is registered with ``sized=True`` and also takes ``image_size``; the CNNs pool adaptively and do not.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Optional

from torch import nn

__all__ = ["MODELS", "SIZED", "available", "create", "init_weights", "register"]

ModelFn = Callable[..., nn.Module]

MODELS: dict[str, ModelFn] = {}
SIZED: set[str] = set()  # names whose constructor takes ``image_size``


def register(name: str, *, sized: bool = False) -> Callable[[ModelFn], ModelFn]:
    """Decorator: add a constructor ``fn(num_classes, in_channels, **kwargs)`` to ``MODELS`` as ``name``;
    ``sized=True``: it takes ``image_size`` too (the side of the square input, in pixels)."""

    def decorator(fn: ModelFn) -> ModelFn:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered (by {MODELS[name].__module__})")
        MODELS[name] = fn
        if sized:
            SIZED.add(name)
        return fn

    return decorator


def available() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def create(name: str, num_classes: int, in_channels: int = 3, image_size: Optional[int] = None,
           **kwargs) -> nn.Module:
    """Build the model registered as ``name``; extra ``kwargs`` go to its constructor.

    ``image_size`` (the data's, e.g. 28 for Fashion-MNIST) goes to sized models only (``SIZED``); ``None``
    leaves their own default. An unknown name raises ``ValueError`` with the closest registered name and
    the full list.
    """
    if name not in MODELS:
        names = available()
        closest = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.0)
        hint = f" Did you mean {closest[0]!r}?" if closest else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available models: {', '.join(names)}")
    if name in SIZED and image_size is not None:
        kwargs["image_size"] = image_size
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU gain; He et al. 2015), BN to identity, zero biases.

    Linear layers keep PyTorch's default init, as in torchvision's ResNets.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
