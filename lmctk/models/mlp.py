"""The `mlp` reference model: flatten, hidden Linear+activation layers, a linear output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from lmctk.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Parameters `hidden.{i}.weight/bias` (i = 0..len(widths)-1) and `out.weight/bias`."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"mlp: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        sizes = [math.prod(in_shape), *widths]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.activation = ACTIVATIONS[activation]()
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.out(x)
