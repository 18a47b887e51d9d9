"""The `cnn` reference model: small VGG-style conv blocks, global average pooling, a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from lmctk.models.layers import ConvNorm, image_shape


class CNN(nn.Module):
    """Blocks of conv3x3-norm-ReLU, each followed by 2x2 max-pooling while the map is at least 2x2.

    Parameters: `blocks.{i}.conv.weight` (+ `.conv.bias` when norm="none"), `blocks.{i}.norm.*`
    (weight, bias; BatchNorm adds running stats), `head.weight/bias`.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        in_channels, height, width = image_shape("cnn", in_shape)
        sizes = [in_channels, *channels]
        self.blocks = nn.ModuleList(ConvNorm(a, b, 3, 1, norm) for a, b in pairwise(sizes))
        side, self.pool_after = min(height, width), []
        for _ in self.blocks:
            self.pool_after.append(side >= 2)
            side = max(side // 2, 1)
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, pool in zip(self.blocks, self.pool_after):
            x = torch.relu(block(x))
            x = nn.functional.max_pool2d(x, 2) if pool else x
        return self.head(x.mean(dim=(2, 3)))
