"""VGG-19 with BN for CIFAR (Simonyan & Zisserman 2015, configuration E).

Sixteen 3x3 conv-BN-ReLU layers in five stages, each closed by a 2x2 max-pool (32 -> 1), then one
linear classifier on the 512 features, as is usual for CIFAR (no 4096-wide fully connected layers).
Adaptive pooling before the classifier lets other input sizes through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import init_weights, register

__all__ = ["POOL", "VGG", "VGG19_CONFIG"]

POOL = "M"
VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, POOL,
    128, 128, POOL,
    256, 256, 256, 256, POOL,
    512, 512, 512, 512, POOL,
    512, 512, 512, 512, POOL,
)


class VGG(nn.Module):
    """A VGG with BN: ``config`` lists conv widths and ``POOL`` markers."""

    def __init__(self, config: Sequence[int | str], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                # conv bias is redundant before BN
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 32, 32]
        x = self.features(x)  # [B, 512, 1, 1]
        x = self.pool(x).flatten(1)  # [B, 512]
        return self.classifier(x)  # [B, num_classes]


@register("vgg19")
def vgg19(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-19-BN for CIFAR, ~20.0M parameters for 10 classes."""
    return VGG(VGG19_CONFIG, num_classes, in_channels)
