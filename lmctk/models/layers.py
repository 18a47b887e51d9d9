"""Convolution building blocks shared by the `cnn` and `resnet20` reference models."""

from __future__ import annotations

from torch import nn

from lmctk.errors import ConfigError

NORMS = ("none", "batchnorm", "layernorm")


def norm2d(kind: str, channels: int) -> nn.Module:
    """A normalisation of conv maps whose parameters are per-channel (so channel permutations act on them).

    "layernorm" is GroupNorm(1, C): statistics over (C, H, W) of each example, affine weight and
    bias per channel. "none" is Identity.
    """
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str) -> nn.Conv2d:
    """A same-padded convolution; it has a bias only when no norm follows (a norm's bias replaces it)."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=norm == "none"
    )


class ConvNorm(nn.Module):
    """`conv` then `norm` (no activation), as used by VGG blocks, the ResNet stem and its shortcuts."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride, norm)
        self.norm = norm2d(norm, out_channels)

    def forward(self, x):
        return self.norm(self.conv(x))


def image_shape(model: str, in_shape) -> tuple[int, int, int]:
    """`in_shape` as (C, H, W), or a ConfigError saying that `model` needs image inputs."""
    shape = tuple(int(n) for n in in_shape)
    if len(shape) != 3:
        raise ConfigError(
            f"{model}: in_shape {shape} is not (C, H, W); use an image task (digits, synthetic image=True)"
        )
    return shape
