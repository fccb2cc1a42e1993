"""torchvision's ImageNet ResNets, untrained, with our ``num_classes`` / ``in_channels`` convention.

Built with ``weights=None`` (nothing is downloaded) and torchvision's own init. For
``in_channels != 3`` the stem ``conv1`` is replaced by a conv of the same shape otherwise; the
replacement keeps ``conv1``'s place in the module order, so it stays the first conv ``sparsify`` sees.
Extra kwargs (``zero_init_residual``, ``norm_layer``, ...) go to torchvision.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from .registry import register

__all__ = ["adapt_stem"]

RGB_CHANNELS = 3  # what torchvision's stems are built for


def adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace ``model.conv1`` by a Kaiming-initialised copy taking ``in_channels`` inputs."""
    old: nn.Conv2d = model.conv1
    if in_channels == old.in_channels:
        return model
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.conv1 = new  # same attribute, same position in named_modules()
    return model


def _torchvision_resnet(builder: Callable[..., nn.Module], num_classes: int, in_channels: int,
                        **kwargs) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    return adapt_stem(model, in_channels)


@register("resnet18")
def resnet18(num_classes: int, in_channels: int = RGB_CHANNELS, **kwargs) -> nn.Module:
    """torchvision ResNet-18 (224x224 stem), ~11.7M parameters for 1000 classes."""
    return _torchvision_resnet(torchvision.models.resnet18, num_classes, in_channels, **kwargs)


@register("resnet50")
def resnet50(num_classes: int, in_channels: int = RGB_CHANNELS, **kwargs) -> nn.Module:
    """torchvision ResNet-50 (224x224 stem), ~25.6M parameters for 1000 classes."""
    return _torchvision_resnet(torchvision.models.resnet50, num_classes, in_channels, **kwargs)
