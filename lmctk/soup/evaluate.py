"""Scoring states on a task with one model skeleton (see `lmctk.loading`): load a state, evaluate a split.

Scores are "higher is better": accuracy as is, loss negated. The held-out split is "val", never "test".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmctk.errors import ConfigError
from lmctk.io import KeyMap
from lmctk.loading import checkpoint_skeleton, load_into
from lmctk.tasks import Task, evaluate

METRICS = ("accuracy", "loss")


@dataclass
class Scorer:
    """Evaluates states with one model skeleton; `score` is the held-out selection score (higher is better).

    The metric defaults to loss, not accuracy: on small held-out sets accuracy ties are common, and a
    strict greedy soup would then reject every near-identical fine-tune.
    """

    model: nn.Module
    task: Task
    metric: str = "loss"
    split: str = "val"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"metric: unknown {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.split == "test":
            raise ConfigError("split: the held-out selection split must not be 'test'; use 'val'")
        self.keys = KeyMap.of(self.model)

    @classmethod
    def for_checkpoint(cls, path: str | Path, task: Task, metric: str = "loss") -> Scorer:
        """A scorer whose skeleton matches the checkpoint at `path`."""
        return cls(checkpoint_skeleton(path, task), task, metric)

    def metrics(self, state: Mapping[str, torch.Tensor], split: str) -> dict[str, float]:
        """Loss, accuracy and count of `state` on `split`."""
        load_into(self.model, state, "soup state", self.keys)
        return evaluate(self.model, self.task, split)

    def value(self, metrics: Mapping[str, float]) -> float:
        """The selection score of some metrics: accuracy, or negated loss."""
        return metrics["accuracy"] if self.metric == "accuracy" else -metrics["loss"]

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        """The held-out score of `state` (higher is better)."""
        return self.value(self.metrics(state, self.split))
