"""Permutation specs of the reference vision models (`mlp`, `cnn`, `resnet20`).

A group is named after the module whose output units it indexes, so it reads like the keys:
- MLP: `hidden.{i}` — the units of hidden layer i;
- CNN: `blocks.{i}` — the channels of conv block i;
- ResNet20: `stages.{s}.res` — the residual stream of stage s (the stem writes `stages.0.res`;
  identity shortcuts keep a stage's blocks on it, the 1x1 projection shortcut of a stage's first
  block maps `stages.{s-1}.res` onto it); `stages.{s}.{b}.inner` — the channels between conv1 and
  conv2 of block b.
Norms (BatchNorm running stats included, GroupNorm "layernorm") follow their channels; a BatchNorm's
`num_batches_tracked` counter has no axis and is left out (so `spec.unpermuted` lists it, with the
classifier bias). The input axis of the first layer and the classifier outputs are never permuted.
A builder raises if the model holds a tensor it does not know, instead of leaving it unpermuted.
"""

from __future__ import annotations

from torch import nn

from lmctk.errors import ConfigError
from lmctk.models.layers import ConvNorm
from lmctk.spec.core import Axes, PermutationSpec
from lmctk.spec.registry import register

COUNTER = "num_batches_tracked"  # a BatchNorm step count: nothing to permute


def _layer(axes: dict[str, Axes], prefix: str, module: nn.Module, out: str | None, inp: str | None) -> None:
    """A Linear or Conv: weight [out, in, *kernel] and, when present, bias [out]."""
    axes[f"{prefix}.weight"] = (out, inp) + (None,) * (module.weight.dim() - 2)
    if module.bias is not None:
        axes[f"{prefix}.bias"] = (out,)


def _norm(axes: dict[str, Axes], prefix: str, module: nn.Module, group: str) -> None:
    """Every per-channel parameter and running stat of a norm (none for Identity); not the counter."""
    for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if name != COUNTER:
            axes[f"{prefix}.{name}"] = (group,)


def _conv_norm(axes: dict[str, Axes], prefix: str, module: ConvNorm, out: str, inp: str | None) -> None:
    """A conv and the norm on its output channels (CNN blocks, the ResNet stem and shortcuts)."""
    _layer(axes, f"{prefix}.conv", module.conv, out, inp)
    _norm(axes, f"{prefix}.norm", module.norm, out)


def _basic_block(
    axes: dict[str, Axes], groups: dict[str, int], prefix: str, block: nn.Module, res_in: str, res_out: str
) -> None:
    """conv1/norm1 map the incoming stream onto the block's inner group, conv2/norm2 back onto the
    outgoing stream; a projection shortcut maps in -> out, an identity one needs in == out."""
    inner = f"{prefix}.inner"
    groups[inner] = block.conv1.out_channels
    _layer(axes, f"{prefix}.conv1", block.conv1, inner, res_in)
    _norm(axes, f"{prefix}.norm1", block.norm1, inner)
    _layer(axes, f"{prefix}.conv2", block.conv2, res_out, inner)
    _norm(axes, f"{prefix}.norm2", block.norm2, res_out)
    if isinstance(block.shortcut, ConvNorm):
        _conv_norm(axes, f"{prefix}.shortcut", block.shortcut, res_out, res_in)
    elif res_in != res_out:
        raise ConfigError(f"resnet20: {prefix} has an identity shortcut between streams {res_in} and {res_out}")


def _finish(model: nn.Module, name: str, groups: dict[str, int], axes: dict[str, Axes]) -> PermutationSpec:
    """The spec, after checking that every tensor of the model is covered (or is a BN counter)."""
    unknown = [k for k in model.state_dict() if k not in axes and not k.endswith(f".{COUNTER}")]
    if unknown:
        raise ConfigError(
            f"spec {name}: {type(model).__name__} has tensors the builder does not know "
            f"({', '.join(unknown[:3])}); build a PermutationSpec for this variant and pass it as spec="
        )
    return PermutationSpec(groups, axes, name=name)


@register("MLP")
def mlp(model: nn.Module) -> PermutationSpec:
    """Hidden layer i's units are group `hidden.{i}`; it permutes that layer's rows and the next one's columns."""
    groups: dict[str, int] = {}
    axes: dict[str, Axes] = {}
    previous = None
    for i, layer in enumerate(model.hidden):
        groups[f"hidden.{i}"] = layer.out_features
        _layer(axes, f"hidden.{i}", layer, f"hidden.{i}", previous)
        previous = f"hidden.{i}"
    _layer(axes, "out", model.out, None, previous)
    return _finish(model, "mlp", groups, axes)


@register("CNN")
def cnn(model: nn.Module) -> PermutationSpec:
    """Block i's channels are group `blocks.{i}` (conv, norm, the next conv's input, finally the head's input)."""
    groups: dict[str, int] = {}
    axes: dict[str, Axes] = {}
    previous = None
    for i, block in enumerate(model.blocks):
        groups[f"blocks.{i}"] = block.conv.out_channels
        _conv_norm(axes, f"blocks.{i}", block, f"blocks.{i}", previous)
        previous = f"blocks.{i}"
    _layer(axes, "head", model.head, None, previous)
    return _finish(model, "cnn", groups, axes)


@register("ResNet20")
def resnet20(model: nn.Module) -> PermutationSpec:
    """One residual group per stage shared by its blocks and the stem (stage 0), one inner group per block."""
    groups: dict[str, int] = {"stages.0.res": model.stem.conv.out_channels}
    axes: dict[str, Axes] = {}
    _conv_norm(axes, "stem", model.stem, "stages.0.res", None)
    stream = "stages.0.res"
    for s, stage in enumerate(model.stages):
        incoming = stream
        if isinstance(stage[0].shortcut, ConvNorm):  # the stage changes width/stride: a new stream
            stream = f"stages.{s}.res"
            groups[stream] = stage[0].conv2.out_channels
        for b, block in enumerate(stage):
            _basic_block(axes, groups, f"stages.{s}.{b}", block, incoming if b == 0 else stream, stream)
    _layer(axes, "head", model.head, None, stream)
    return _finish(model, "resnet20", groups, axes)
