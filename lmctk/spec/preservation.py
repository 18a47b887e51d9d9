"""Function-preservation check: a spec is right only if permuting by random perms keeps outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lmctk.errors import ConfigError
from lmctk.spec.core import PermutationSpec, random_perms
from lmctk.spec.permute import permute_state


@dataclass
class CheckResult:
    """Worst relative output error over the trials, and what the spec left unpermuted."""

    max_rel_error: float
    trials: int
    tolerance: float
    unpermuted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


def example_inputs(model: nn.Module, generator: torch.Generator, batch: int = 3) -> dict[str, torch.Tensor]:
    """A small random input batch for a reference model (`in_shape`) or an HF LM (`config`)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 16)
        length = min(12, positions)
        ids = torch.randint(config.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    in_shape = getattr(model, "in_shape", None)
    if in_shape is None:
        raise ConfigError(f"{type(model).__name__}: cannot invent inputs; pass inputs= to spec.check")
    return {"x": torch.randn(batch, *in_shape, generator=generator)}


def _outputs(model: nn.Module, state: dict[str, torch.Tensor], inputs: dict[str, Any]) -> torch.Tensor:
    """Logits of a model with a head, the last hidden state of a headless HF model, or the tensor returned."""
    out = functional_call(model, state, args=(), kwargs=inputs, tie_weights=False)
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name).to(torch.float64)
    return out.to(torch.float64)


@torch.no_grad()
def model_outputs(model: nn.Module, state: dict[str, torch.Tensor], inputs: dict[str, Any]) -> torch.Tensor:
    """The model's outputs (float64) with `state`'s tensors in it, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return _outputs(model, state, inputs)
    finally:
        model.train(was_training)


def relative_difference(reference: torch.Tensor, y: torch.Tensor) -> float:
    """max |reference - y| / max |reference|."""
    return float((reference - y).abs().max() / reference.abs().max().clamp_min(1e-30))


def output_difference(
    model: nn.Module, state: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
    inputs: dict[str, Any] | None = None, seed: int = 0, unpermute: torch.Tensor | None = None,
) -> float:
    """max |y(state) - y(other)| / max |y(state)| on `inputs` (default: a small random batch), eval mode.

    `unpermute` re-orders the last axis of y(other) first (for outputs that carry a permuted group).
    """
    inputs = inputs if inputs is not None else example_inputs(model, torch.Generator().manual_seed(seed))
    reference = model_outputs(model, state, inputs)
    y = model_outputs(model, other, inputs)
    if unpermute is not None:
        y = y.index_select(-1, unpermute.to(y.device))
    return relative_difference(reference, y)


@torch.no_grad()
def check(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: dict[str, Any] | None = None,
    *,
    trials: int = 2,
    seed: int = 0,
    tolerance: float = 1e-5,
    output_group: str | None = None,
) -> CheckResult:
    """Permute the model's state with random perms and compare outputs (eval mode, float64 compare).

    Every group of size >= 2 is really moved in every trial, so a wrong spec cannot pass by luck.
    Relative error = max |y - y_perm| / max |y|. A spec passes when it is <= `tolerance`. For a model
    whose output features are themselves permuted (a headless transformer's hidden states: the
    residual group), name that group as `output_group` and the output is un-permuted before comparing.
    """
    if output_group is not None and output_group not in spec.groups:
        raise ConfigError(f"output_group: {output_group!r} is not a group of spec {spec.name}; "
                          f"choose one of {', '.join(spec.groups)}")
    gen = torch.Generator().manual_seed(seed)
    inputs = inputs if inputs is not None else example_inputs(model, gen)
    state = dict(model.state_dict(keep_vars=False))
    spec.validate({k: v.shape for k, v in state.items()})
    worst = 0.0
    for _ in range(trials):
        perms = random_perms(spec, gen, moving=True)
        permuted = permute_state(state, spec, perms)
        unpermute = torch.argsort(perms[output_group]) if output_group is not None else None
        worst = max(worst, output_difference(model, state, permuted, inputs, unpermute=unpermute))
    return CheckResult(worst, trials, tolerance, spec.unpermuted(state.keys()))
