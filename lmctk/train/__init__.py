"""Deterministic training: `TrainConfig`, the step-wise `Trainer`, `fit` into a run dir, vmapped `Replicas`."""

from lmctk.train.config import (
    TrainConfig,
    log_spaced_steps,
    lr_at,
    resolve_device,
)
from lmctk.train.fit import TrainResult, fit, load_run_model
from lmctk.train.rng import IsolatedRNG, deterministic
from lmctk.train.trainer import (
    TRAINER_FILE,
    Trainer,
    config_skeleton,
    init_model,
    step_batch,
)

__all__ = [
    "TRAINER_FILE",
    "IsolatedRNG",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "config_skeleton",
    "deterministic",
    "fit",
    "init_model",
    "load_run_model",
    "log_spaced_steps",
    "lr_at",
    "resolve_device",
    "step_batch",
]
