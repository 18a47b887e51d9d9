"""Function-preservation check: a spec is right only if permuting by random perms keeps outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lmctk.errors import ConfigError
from lmctk.spec.core import PermutationSpec, permute_state, random_perms


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
    out = functional_call(model, state, args=(), kwargs=inputs, tie_weights=False)
    return (out.logits if hasattr(out, "logits") else out).to(torch.float64)


@torch.no_grad()
def output_difference(
    model: nn.Module, state: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
    inputs: dict[str, Any] | None = None, seed: int = 0,
) -> float:
    """max |y(state) - y(other)| / max |y(state)| on `inputs` (default: a small random batch), eval mode."""
    was_training = model.training
    model.eval()
    try:
        inputs = inputs if inputs is not None else example_inputs(model, torch.Generator().manual_seed(seed))
        reference = _outputs(model, state, inputs)
        return float((reference - _outputs(model, other, inputs)).abs().max() / reference.abs().max().clamp_min(1e-30))
    finally:
        model.train(was_training)


@torch.no_grad()
def check(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: dict[str, Any] | None = None,
    *,
    trials: int = 2,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> CheckResult:
    """Permute the model's state with random perms and compare outputs (eval mode, float64 compare).

    Every group of size >= 2 is really moved in every trial, so a wrong spec cannot pass by luck.
    Relative error = max |y - y_perm| / max |y|. A spec passes when it is <= `tolerance`.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = inputs if inputs is not None else example_inputs(model, gen)
    state = dict(model.state_dict(keep_vars=False))
    spec.validate({k: v.shape for k, v in state.items()})
    worst = 0.0
    for _ in range(trials):
        permuted = permute_state(state, spec, random_perms(spec, gen, moving=True))
        worst = max(worst, output_difference(model, state, permuted, inputs))
    return CheckResult(worst, trials, tolerance, spec.unpermuted(state.keys()))
