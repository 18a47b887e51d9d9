"""Perturbations injected into one twin at step t: parameter noise, a swapped batch, another data
order, or another dropout seed (Altintas et al. 2025; Frankle et al. 2020).

Every perturbation draws from its own generator (`PerturbConfig.seed`), never from a global RNG, so the
same spec gives the same perturbation on any machine; `inject` returns what was realised (its norm).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmctk.errors import ConfigError
from lmctk.models import has_dropout
from lmctk.seeding import derive_seed
from lmctk.tasks.base import Batch
from lmctk.train import Trainer, step_batch

KINDS = ("gaussian", "batch", "data_order", "dropout")
REFS = ("init_std", "param_norm", "absolute")


@dataclass
class PerturbConfig:
    """One perturbation. `scale` = 0 is the zero perturbation (the control) for every kind.

    gaussian: ε ~ N(0, (scale·ref)²) per tensor, ref = its std at init | its RMS now | 1;
    batch: the step's batch (a `fraction` of its examples) is replaced from the spec's own stream;
    data_order / dropout: another data-order / dropout seed from this step on (scale is on/off).
    """

    kind: Literal["gaussian", "batch", "data_order", "dropout"] = "gaussian"
    scale: float = 0.0
    ref: Literal["init_std", "param_norm", "absolute"] = "init_std"
    fraction: float = 1.0  # gaussian: share of the selected weights perturbed (at least one); batch: of examples
    include: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names (empty: all)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: unknown {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.ref not in REFS:
            raise ConfigError(f"ref: unknown {self.ref!r}; choose one of {', '.join(REFS)}")
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ConfigError(f"scale: must be a finite number >= 0, got {self.scale}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")

    @property
    def is_zero(self) -> bool:
        return self.scale == 0.0


@dataclass
class Injection:
    """What `inject` did: a JSON-able description (incl. the realised norm) and, for `batch`, the batch to train on."""

    info: dict[str, Any]
    batch: Batch | None = None


def selected_parameters(model: nn.Module, include: list[str], exclude: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose names match any `include` pattern (all if empty) and no `exclude` pattern."""
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        out.append((name, p))
    if not out:
        raise ConfigError(f"perturb: include={include} exclude={exclude} select no parameter; "
                          f"names look like {', '.join(n for n, _ in list(model.named_parameters())[:3])}")
    return out


def init_stds(model: nn.Module) -> dict[str, float]:
    """Per-tensor standard deviation of the parameters (call on the model at initialisation)."""
    return {n: float(p.detach().double().std()) if p.numel() > 1 else 0.0 for n, p in model.named_parameters()}


def gaussian_noise(model: nn.Module, spec: PerturbConfig, init_std: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """The noise ε per selected parameter (float32 on the CPU, then the parameter's dtype): reproducible anywhere."""
    params = selected_parameters(model, spec.include, spec.exclude)
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, "gaussian"))
    noise = {}
    for name, p in params:
        if spec.ref == "init_std":
            if init_std is None:
                raise ConfigError("perturb: ref='init_std' needs the per-tensor std at initialisation")
            ref = init_std[name]
        elif spec.ref == "param_norm":
            ref = float(p.detach().double().norm()) / math.sqrt(p.numel())
        else:
            ref = 1.0
        noise[name] = torch.randn(p.shape, generator=gen) * (spec.scale * ref)
    if spec.fraction < 1.0:
        total = sum(v.numel() for v in noise.values())
        keep = max(1, round(spec.fraction * total))
        mask = torch.zeros(total, dtype=torch.bool)
        mask[torch.randperm(total, generator=gen)[:keep]] = True
        offset = 0
        for name, v in noise.items():
            v.view(-1).mul_(mask[offset:offset + v.numel()])
            offset += v.numel()
    return noise


def replacement_batch(trainer: Trainer, spec: PerturbConfig) -> tuple[Batch, int]:
    """The batch of `trainer.step` with a `fraction` of its examples redrawn from the spec's own stream.

    The batch is built with the step's own generator, so the examples kept are exactly the twin's.
    """
    indices = trainer.data_order.indices(trainer.step).clone()
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, "batch"))
    replace = max(1, round(spec.fraction * len(indices)))
    indices[:replace] = torch.randperm(trainer.task.num_train, generator=gen)[:replace]
    return step_batch(trainer.task, trainer.data_order, trainer.step, indices).to(trainer.device), replace


def inject(trainer: Trainer, spec: PerturbConfig, init_std: dict[str, float] | None = None) -> Injection:
    """Perturb `trainer` at its current step; returns what was realised.

    gaussian changes the weights in place; data_order/dropout swap the twin's stream; batch returns
    the batch the twin trains on at this step. A zero spec changes nothing.
    """
    info: dict[str, Any] = {"kind": spec.kind, "scale": spec.scale, "step": trainer.step, "seed": spec.seed}
    if spec.is_zero:
        info["norm"] = 0.0
        return Injection(info)
    if spec.kind == "gaussian":
        noise = gaussian_noise(trainer.model, spec, init_std)
        params = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, eps in noise.items():
                params[name].add_(eps.to(params[name].device, params[name].dtype))
        info["norm"] = math.sqrt(sum(float(e.double().square().sum()) for e in noise.values()))
        info["perturbed"] = sum(int((e != 0).sum()) for e in noise.values())
        return Injection(info)
    if spec.kind == "batch":
        batch, replaced = replacement_batch(trainer, spec)
        info["replaced_examples"] = replaced
        info["norm"] = None  # not a weight-space perturbation; see the twins' L2 after the step
        return Injection(info, batch)
    if spec.kind == "data_order":
        seed = derive_seed(spec.seed, "data_order")
        trainer.set_data_seed(seed)
        info.update(data_seed=seed, norm=None)
        return Injection(info)
    if not has_dropout(trainer.model):
        raise ConfigError("perturb kind 'dropout': the model has no dropout (p > 0), so another dropout seed "
                          "changes nothing; set a dropout model option or use another kind")
    seed = derive_seed(spec.seed, "dropout")
    trainer.set_dropout_seed(seed)
    info.update(dropout_seed=seed, norm=None)
    return Injection(info)
