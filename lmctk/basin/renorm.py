"""Renormalising interpolated networks: BatchNorm reset and REPAIR (Jordan et al. 2022).

Interpolating two networks shrinks the variance of hidden activations ("variance collapse").
- BN reset recomputes every BatchNorm's running mean/var of θ(α) on fixed training batches.
- REPAIR, for networks without BatchNorm, rescales and shifts every channel of θ(α) so that its
  activation mean and std equal the interpolation of the endpoints' statistics, and folds that
  affine map back into the weights of the layer producing the channel. Covered layers: `nn.Linear`
  and `nn.Conv1d/2d/3d` with a bias (output features/channels) and `nn.GroupNorm`/`nn.LayerNorm`
  with an affine weight and bias (their per-channel output); the model's last such layer (the
  classifier head) is left alone. Bias-free convs followed by a GroupNorm are covered through that
  GroupNorm (ResNet-20 norm="layernorm"). HF transformers are not covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from lmctk.errors import ConfigError
from lmctk.tasks.base import Task, forward

RENORMS = ("none", "bn_reset", "repair")
_TINY = 1e-8  # a channel whose std is below this is constant: it is shifted, not rescaled


def calibration_batches(task: Task, count: int, batch_size: int, seed: int, device: torch.device | str) -> list:
    """`count` training batches of `batch_size` drawn with their own generator: the same for every α."""
    if count < 1 or batch_size < 1:
        raise ConfigError(f"calibration: {count} batches of {batch_size}; give positive numbers")
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, task.num_train)
    order = torch.cat([torch.randperm(task.num_train, generator=generator)
                       for _ in range(-(-count * size // task.num_train))])
    return [task.train_batch(order[i * size:(i + 1) * size], generator).to(device) for i in range(count)]


def run_batches(model: nn.Module, batches: Sequence, task: Task) -> None:
    """Forward `batches` through `model` without gradients (statistics are gathered by the model or hooks)."""
    with torch.no_grad():
        for batch in batches:
            forward(model, batch, task)


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def reset_batchnorm(model: nn.Module, batches: Sequence, task: Task) -> None:
    """Recompute every BatchNorm's running mean/var as the exact average over `batches` (momentum=None);
    other modules (dropout) stay in eval mode. The model is left in eval mode."""
    layers = batchnorms(model)
    if not layers:
        raise ConfigError("bn_reset: the model has no BatchNorm layers; use renorm='repair' (or 'none')")
    model.eval()
    momenta = [m.momentum for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        run_batches(model, batches, task)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


def repair_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers REPAIR corrects, by module name, in module order (see the module docstring)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is not None:
            found[name] = m
        elif isinstance(m, nn.GroupNorm) and m.affine:
            found[name] = m
        elif isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None \
                and len(m.normalized_shape) == 1:
            found[name] = m
    if found:
        found.pop(list(found)[-1])  # the head: its output is the logits, not a hidden channel
    return found


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _flat(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Channels as columns: [everything else, C]."""
    return y.movedim(dim, -1).reshape(-1, y.shape[dim]).double()


@contextmanager
def _hooks(layers: dict[str, nn.Module], hook_for) -> Iterator[None]:
    handles = [m.register_forward_hook(hook_for(name, m)) for name, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _accumulate(sums: dict[str, list], name: str, flat: torch.Tensor) -> None:
    """Add a [rows, C] block to the running (sum, sum of squares, rows) of layer `name`."""
    s = sums.setdefault(name, [0, 0, 0])
    s[0] += flat.sum(0)
    s[1] += flat.square().sum(0)
    s[2] += flat.shape[0]


def _mean_std(s: torch.Tensor, sq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, population std) from the sums kept by `_accumulate`."""
    mean = s / n
    return mean, (sq / n - mean.square()).clamp_min(0).sqrt()


def channel_stats(model: nn.Module, batches: Sequence, task: Task, layers: Sequence[str],
                  state: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each named layer's output over `batches`, run in eval mode (float64;
    the model's mode is restored). With `state`, the model runs with those tensors (`functional_call`):
    its own weights are neither used nor changed, so no copy of it is needed.
    """
    modules = dict(model.named_modules())
    sums: dict[str, list] = {}

    def hook_for(name, m):
        def hook(_module, _inputs, y):
            _accumulate(sums, name, _flat(y, _channel_dim(m)))
        return hook

    was_training = model.training
    model.eval()
    try:
        with _hooks({n: modules[n] for n in layers}, hook_for):
            if state is None:
                run_batches(model, batches, task)
            else:
                with torch.no_grad():
                    for batch in batches:
                        functional_call(model, dict(state), args=(), kwargs=batch.inputs)
    finally:
        model.train(was_training)
    return {name: _mean_std(*s) for name, s in sums.items()}


def _scale(target_std: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return torch.where(std > _TINY, target_std / std.clamp_min(_TINY), torch.ones_like(std))


class Repair:
    """REPAIR for one path: endpoint statistics are measured once; `__call__(model, α)` corrects θ(α).

    Statistics of θ(α) are gathered in one pass in which each covered layer already emits its
    corrected output (normalised by the batch's own statistics, then given the target mean/std),
    so later layers see corrected inputs, as with REPAIR's train-mode BatchNorm trick; then each
    channel's map y ↦ s·(y − μ) + t (s = σ_target/σ, t = μ_target) is folded into weight and bias.
    """

    def __init__(self, model: nn.Module, a: dict, b: dict, batches: Sequence, task: Task,
                 stats_a: dict | None = None) -> None:
        """`model` gives the architecture (its weights are not used or changed); `stats_a`: A's statistics
        on the same `batches` when already measured (an aligned sweep reuses the raw sweep's)."""
        if batchnorms(model):
            raise ConfigError("repair: the model has BatchNorm layers; use renorm='bn_reset' for it")
        if hasattr(getattr(model, "config", None), "model_type"):
            raise ConfigError("repair covers the reference models (mlp, cnn, resnet20 with norm none or "
                              "layernorm), not Hugging Face transformers; use renorm='none'")
        self.layers = list(repair_layers(model))
        if not self.layers:
            raise ConfigError(
                f"repair: {type(model).__name__} has no layer REPAIR covers (Linear/Conv with bias, "
                "GroupNorm/LayerNorm with affine) besides its head; use renorm='none'"
            )
        self.batches, self.task = batches, task
        self.stats_a = stats_a if stats_a is not None else channel_stats(model, batches, task, self.layers, a)
        self.stats_b = channel_stats(model, batches, task, self.layers, b)

    def __call__(self, model: nn.Module, alpha: float) -> None:
        modules = dict(model.named_modules())
        target = {n: ((1 - alpha) * self.stats_a[n][0] + alpha * self.stats_b[n][0],
                      (1 - alpha) * self.stats_a[n][1] + alpha * self.stats_b[n][1]) for n in self.layers}
        sums: dict[str, list] = {}

        def hook_for(name, m):
            dim = _channel_dim(m)

            def hook(_module, _inputs, y):
                flat = _flat(y, dim)
                _accumulate(sums, name, flat)
                mean, std = flat.mean(0), flat.var(0, unbiased=False).sqrt()
                shape = [1] * y.dim()
                shape[dim] = -1
                scale = _scale(target[name][1], std).view(shape)
                return ((y.double() - mean.view(shape)) * scale + target[name][0].view(shape)).to(y.dtype)
            return hook

        model.eval()
        with _hooks({n: modules[n] for n in self.layers}, hook_for):
            run_batches(model, self.batches, self.task)
        with torch.no_grad():
            for name in self.layers:
                mean, std = _mean_std(*sums[name])
                scale = _scale(target[name][1], std)
                shift = target[name][0] - scale * mean
                m = modules[name]
                w = m.weight
                w.mul_(scale.to(w.dtype).view(-1, *[1] * (w.dim() - 1)))
                m.bias.mul_(scale.to(w.dtype).view(m.bias.shape)).add_(shift.to(w.dtype).view(m.bias.shape))
