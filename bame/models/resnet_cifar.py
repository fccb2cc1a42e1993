"""CIFAR ResNets (He et al. 2016, Sec. 4.2): ResNet-20/32/56 and the wider ResNet-32.

Depth ``6n + 2``: a 3x3 stem conv, three stages of ``n`` BasicBlocks at widths ``(16, 32, 64)`` and
spatial sizes 32, 16, 8 (stages 2 and 3 down-sample by stride 2 in their first block), global average
pooling and one linear classifier. Shortcuts that change shape are 1x1 conv + BN projections (the
paper's option B), so every weight is a conv or linear layer that ``sparsify`` can see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import init_weights, register

__all__ = ["CIFAR_WIDTHS", "BasicBlock", "CifarResNet"]

CIFAR_WIDTHS = (16, 32, 64)  # channels of the three stages in He et al. 2016
BLOCKS_PER_DEPTH = 6  # depth = 6n + 2: n blocks x 2 convs x 3 stages, plus stem and classifier
STEM_AND_HEAD = 2


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # option B: a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_planes, H, W] -> [B, planes, H / stride, W / stride]
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; works at any input size thanks to adaptive pooling."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3,
                 widths: Sequence[int] = CIFAR_WIDTHS) -> None:
        super().__init__()
        if depth < BLOCKS_PER_DEPTH + STEM_AND_HEAD or (depth - STEM_AND_HEAD) % BLOCKS_PER_DEPTH:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        if len(widths) != len(CIFAR_WIDTHS):
            raise ValueError(f"CIFAR ResNet needs {len(CIFAR_WIDTHS)} stage widths, got {tuple(widths)}")
        blocks = (depth - STEM_AND_HEAD) // BLOCKS_PER_DEPTH
        self.depth, self.widths = depth, tuple(widths)

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 32, 32]
        x = torch.relu(self.bn1(self.conv1(x)))  # [B, w0, 32, 32]
        x = self.layer3(self.layer2(self.layer1(x)))  # [B, w2, 8, 8]
        x = self.pool(x).flatten(1)  # [B, w2]
        return self.fc(x)  # [B, num_classes]


def _resnet(depth: int, num_classes: int, in_channels: int, width_multiplier: int) -> CifarResNet:
    widths = tuple(w * width_multiplier for w in CIFAR_WIDTHS)
    return CifarResNet(depth, num_classes, in_channels, widths)


@register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, width_multiplier: int = 1) -> CifarResNet:
    """ResNet-20 (3 blocks per stage), ~0.27M parameters for 10 classes."""
    return _resnet(20, num_classes, in_channels, width_multiplier)


@register("resnet32")
def resnet32(num_classes: int, in_channels: int = 3, width_multiplier: int = 1) -> CifarResNet:
    """ResNet-32 (5 blocks per stage), ~0.47M parameters for 10 classes."""
    return _resnet(32, num_classes, in_channels, width_multiplier)


@register("resnet56")
def resnet56(num_classes: int, in_channels: int = 3, width_multiplier: int = 1) -> CifarResNet:
    """ResNet-56 (9 blocks per stage), ~0.86M parameters for 10 classes."""
    return _resnet(56, num_classes, in_channels, width_multiplier)


@register("wide_resnet32")
def wide_resnet32(num_classes: int, in_channels: int = 3, width_multiplier: int = 2) -> CifarResNet:
    """ResNet-32 at twice the width (32/64/128), the wider ResNet-32 of BAME's CIFAR experiments."""
    return _resnet(32, num_classes, in_channels, width_multiplier)
