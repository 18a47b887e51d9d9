"""Training configuration: the fields that define a run, the learning-rate schedule and step lists."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmctk.errors import ConfigError
from lmctk.models import check_options

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


def _field(default: Any, help: str, **cli: str) -> Any:
    """A config field with its one-line help (and CLI flag name when it is not `--field-name`): the
    `lmctk train` options are generated from these, so each option is declared once."""
    factory = default if default in (dict, list) else None
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in the manifest and enough to rebuild it."""

    task: str = _field("digits", "Task: digits, synthetic, text, text-mlm, or module:function.")
    task_options: dict[str, Any] = _field(dict, "Task option key=value (repeatable).", flag="--task-opt")
    model: str = _field("mlp", "Model: mlp, cnn, resnet20, gpt2, gpt_neox, llama, qwen2, bert.")
    model_options: dict[str, Any] = _field(dict, "Model option key=value (repeatable), e.g. widths=64,64.",
                                           flag="--model-opt")
    init_from: str | None = _field(None, "Fine-tune: start from this checkpoint's weights (run dir, HF dir or file).")
    seed: int = _field(0, "Seed; derives separate init, data-order and dropout streams.")
    steps: int = _field(300, "Optimiser steps.")
    batch_size: int = _field(64, "Training batch size.")
    optimizer: str = _field("adamw", "sgd (with momentum) or adamw.")
    lr: float = _field(1e-3, "Peak learning rate.")
    momentum: float = _field(0.9, "SGD momentum.")
    weight_decay: float = _field(0.0, "Weight decay.")
    warmup: int = _field(0, "Linear warmup steps.")
    schedule: str = _field("cosine", "Decay after warmup: constant, cosine or linear.")
    grad_clip: float | None = _field(None, "Clip the global gradient norm to this value.")
    checkpoints: list[int] = _field(list, "Steps to checkpoint, e.g. 0,10,100,300 (the last step always is).")
    eval_every: int = _field(100, "Evaluate train and test every N steps (and at 0 and the end).")
    device: str = _field("cpu", "cpu, cuda, cuda:N or auto.")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        check_options(self.model, self.model_options)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name, least in (("lr", "> 0"), ("momentum", ">= 0"), ("weight_decay", ">= 0"), ("grad_clip", "> 0")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and (value > 0 if least == "> 0" else value >= 0)):
                raise ConfigError(f"{name}: must be a finite number {least}, got {value}")
        if self.warmup < 0 or self.warmup > self.steps:
            raise ConfigError(f"warmup: must be between 0 and steps ({self.steps}), got {self.warmup}")
        bad = [s for s in self.checkpoints if s < 0 or s > self.steps]
        if bad:
            raise ConfigError(f"checkpoints: step {bad[0]} is outside 0..{self.steps}")
        self.checkpoints = sorted(set(int(s) for s in self.checkpoints) | {self.steps})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
        return cls(**d)


def log_spaced_steps(count: int, steps: int) -> list[int]:
    """`count` checkpoint steps spaced evenly in log(step) from 1 to `steps`, plus step 0."""
    if count < 1:
        raise ConfigError(f"log-checkpoints: need at least 1, got {count}")
    if steps < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, math.log10(steps), count)).astype(int))
    return sorted({0, *grid.tolist(), steps})


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for the update made at `step` (0-based): linear warmup, then the decay schedule."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{device}' requested but CUDA is not available; use --device cpu")
    return dev
