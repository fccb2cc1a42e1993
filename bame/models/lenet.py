"""A LeNet-5 style CNN (LeCun et al. 1998) for 28x28 (MNIST) or 32x32 inputs.

conv5x5(6) - ReLU - maxpool2 - conv5x5(16) - ReLU - pool to 5x5 - fc 120 - fc 84 - classifier.
The first conv pads by 2, so a 28x28 image follows the classic path (28 -> 14 -> 10 -> 5) and an
adaptive max-pool brings any other size (32x32: 16 -> 12) to the same 16x5x5 features.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register

__all__ = ["LeNet5"]

KERNEL = 5
PADDING = 2  # "same" for the first conv: 28x28 MNIST digits keep their border
CONV_CHANNELS = (6, 16)
FEATURE_SIZE = 5  # spatial size of the features entering the first fully connected layer
HIDDEN = (120, 84)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; any input of at least 12x12 works."""

    def __init__(self, num_classes: int, in_channels: int = 3, conv_channels: tuple[int, int] = CONV_CHANNELS,
                 hidden: tuple[int, int] = HIDDEN) -> None:
        super().__init__()
        c1, c2 = conv_channels
        h1, h2 = hidden
        self.conv1 = nn.Conv2d(in_channels, c1, KERNEL, padding=PADDING)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, KERNEL)
        self.pool2 = nn.AdaptiveMaxPool2d(FEATURE_SIZE)
        self.fc1 = nn.Linear(c2 * FEATURE_SIZE * FEATURE_SIZE, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.classifier = nn.Linear(h2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 28, 28]
        x = self.pool1(torch.relu(self.conv1(x)))  # [B, c1, 14, 14]
        x = self.pool2(torch.relu(self.conv2(x)))  # [B, c2, 5, 5]
        x = torch.relu(self.fc1(x.flatten(1)))  # [B, h1]
        x = torch.relu(self.fc2(x))  # [B, h2]
        return self.classifier(x)  # [B, num_classes]


@register("lenet5")
def lenet5(num_classes: int, in_channels: int = 3) -> LeNet5:
    """LeNet-5 style CNN, ~62k parameters for 10 classes and 1 input channel."""
    return LeNet5(num_classes, in_channels)


WIDE_CONV_CHANNELS = (16, 32)  # conv2 K = 16*5*5 = 400 and fc1 K = 800: both multiples of 16
WIDE_HIDDEN = (128, 64)  # fc2 K = 128: also N:M up to 1:16


@register("lenet5_wide")
def lenet5_wide(num_classes: int, in_channels: int = 3) -> LeNet5:
    """LeNet-5 with 16/32 conv channels: every layer but the stem and classifier can be N:M up to M=16.

    (Classic LeNet-5's conv2 has K = 6*5*5 = 150, which no M in {4, 8, 16} divides, so it stays dense.)
    """
    return LeNet5(num_classes, in_channels, WIDE_CONV_CHANNELS, WIDE_HIDDEN)
