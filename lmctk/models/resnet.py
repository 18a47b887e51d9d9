"""The `resnet20` reference model: He et al.'s CIFAR ResNet-20 with a width multiplier and a norm choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmctk.errors import ConfigError
from lmctk.models.layers import ConvNorm, conv2d, image_shape, norm2d

STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    """conv1-norm1-ReLU-conv2-norm2 plus the input, through `shortcut` (1x1 ConvNorm) if the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = conv2d(in_channels, out_channels, 3, stride, norm)
        self.norm1 = norm2d(norm, out_channels)
        self.conv2 = conv2d(out_channels, out_channels, 3, 1, norm)
        self.norm2 = norm2d(norm, out_channels)
        reshaped = stride != 1 or in_channels != out_channels
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride, norm) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    """Stem conv3x3, three stages of three basic blocks (16/32/64 x `width` channels, stride 2 at the start
    of stages 2 and 3), global average pooling and a linear head. Works on 1x8x8 and 3x32x32 inputs.

    Parameters: `stem.conv.weight`, `stem.norm.*`, `stages.{s}.{b}.conv1.weight`, `.norm1.*`,
    `.conv2.weight`, `.norm2.*`, `stages.{1,2}.0.shortcut.conv.weight`, `.shortcut.norm.*`,
    `head.weight/bias`; convs carry `.bias` only when norm="none". "layernorm" is GroupNorm(1, C).
    """

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, width: int = 1, norm: str = "batchnorm"
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        if width < 1:
            raise ConfigError(f"resnet20: width={width}; give a positive integer width multiplier")
        in_channels = image_shape("resnet20", in_shape)[0]
        channels = [c * width for c in STAGE_CHANNELS]
        self.stem = ConvNorm(in_channels, channels[0], 3, 1, norm)
        stages, previous = [], channels[0]
        for index, out_channels in enumerate(channels):
            blocks = []
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(previous, out_channels, stride, norm))
                previous = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))
