"""MobileNet-V2 (Sandler et al. 2018) for 32x32 inputs.

The blocks, widths and repeats are the paper's (Table 2); only strides change, as in the common
kuangliu/pytorch-cifar variant: the stem conv and the first down-sampling bottleneck stage (24
channels) use stride 1 instead of 2, so a 32x32 image reaches the head at 4x4 instead of 1x1.
Residuals are the paper's (stride 1 and same width only; no projection shortcuts). Depthwise convs are
``nn.Conv2d(c, c, 3, groups=c)``, which ``sparsify`` keeps dense.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .registry import init_weights, register

__all__ = ["CIFAR_STAGES", "InvertedResidual", "MobileNetV2", "Stage"]


class Stage(NamedTuple):
    """One row of the paper's Table 2: ``repeats`` bottlenecks, the first with ``stride``."""

    expansion: int
    out_channels: int
    repeats: int
    stride: int


CIFAR_STAGES = (
    Stage(1, 16, 1, 1),
    Stage(6, 24, 2, 1),  # stride 2 in the paper: 1 for 32x32 inputs
    Stage(6, 32, 3, 2),
    Stage(6, 64, 4, 2),
    Stage(6, 96, 3, 1),
    Stage(6, 160, 3, 2),
    Stage(6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STEM_STRIDE = 1  # 2 in the paper: 1 for 32x32 inputs


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """conv (same padding, no bias) - BN - optional ReLU6."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers = []
        if expansion != 1:  # with expansion 1 the expand conv would be a plain channel mix: omitted
            layers.append(_conv_bn(in_ch, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))  # depthwise
        layers.append(_conv_bn(hidden, out_ch, 1, act=False))  # linear bottleneck
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_ch, H, W] -> [B, out_ch, H / stride, W / stride]
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNet-V2 with the CIFAR strides; any input size works (adaptive pooling)."""

    def __init__(self, num_classes: int, in_channels: int = 3, stages: tuple[Stage, ...] = CIFAR_STAGES) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, STEM_CHANNELS, 3, STEM_STRIDE)
        blocks, in_ch = [], STEM_CHANNELS
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(InvertedResidual(in_ch, stage.out_channels, stage.stride if i == 0 else 1,
                                               stage.expansion))
                in_ch = stage.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(in_ch, HEAD_CHANNELS, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 32, 32]
        x = self.stem(x)  # [B, 32, 32, 32]
        x = self.blocks(x)  # [B, 320, 4, 4]
        x = self.head(x)  # [B, 1280, 4, 4]
        x = self.pool(x).flatten(1)  # [B, 1280]
        return self.classifier(x)  # [B, num_classes]


@register("mobilenet_v2")
def mobilenet_v2(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """MobileNet-V2 for CIFAR, ~2.24M parameters for 10 classes."""
    return MobileNetV2(num_classes, in_channels)
