"""Scoring states on a task: rebuild a model skeleton from a checkpoint, load a state, evaluate a split.

A skeleton comes from an lmctk run dir (its manifest's config) or a Hugging Face dir (config.json).
Scores are "higher is better": accuracy as is, loss negated. The held-out split is "val", never "test".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmctk.errors import ConfigError
from lmctk.io import resolve_checkpoint
from lmctk.tasks import Task, evaluate, get_task

METRICS = ("accuracy", "loss")


def run_dir_of(path: str | Path) -> Path | None:
    """The lmctk run dir that `path` is (or whose checkpoint dir it is), else None."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if (candidate / "manifest.json").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def task_of(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The (task name, options) a run dir was trained on, or None for other checkpoints."""
    run = run_dir_of(path)
    if run is None:
        return None
    task = json.loads((run / "manifest.json").read_text())["config"]
    return task["task"], task.get("task_options") or {}


def model_config_of(path: str | Path) -> Any:
    """What `lmctk.spec.spec_for` accepts for this checkpoint: a run's model config or an HF config dict."""
    run = run_dir_of(path)
    if run is not None:
        return json.loads((run / "manifest.json").read_text())["model"]
    config = resolve_checkpoint(path) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{path}: no config.json and not an lmctk run dir; cannot tell its architecture")
    return json.loads(config.read_text())


def skeleton(path: str | Path, task: Task) -> nn.Module:
    """A model with the architecture of the checkpoint at `path` (weights to be loaded by the caller)."""
    run = run_dir_of(path)
    if run is not None:
        from lmctk.train import TrainConfig, init_model

        config = TrainConfig.from_dict(json.loads((run / "manifest.json").read_text())["config"])
        return init_model(config, task)
    config_file = resolve_checkpoint(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{path}: cannot rebuild a model to evaluate (no config.json, not an lmctk run dir); "
            "give run dirs or Hugging Face model dirs"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_file.parent)
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls(config)
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM}
    if task.kind not in auto:
        raise ConfigError(f"{path}: config.json names no architecture for a {task.kind} task; add 'architectures'")
    return auto[task.kind].from_config(config)


def resolve_task(task: str | Task | None, options: Mapping[str, Any] | None, paths: Sequence[str | Path]) -> Task:
    """The task to score on: given by name (or object), else the task the first run dir was trained on."""
    if task is not None and not isinstance(task, str):
        return task
    if task is None:
        found = task_of(paths[0]) if paths else None
        if found is None:
            raise ConfigError("--task: needed to score these checkpoints (they are not lmctk run dirs); e.g. --task text")
        task, options = found[0], {**found[1], **(options or {})}
    return get_task(task, **dict(options or {}))


@dataclass
class Scorer:
    """Evaluates states with one model skeleton; `score` is the held-out selection score (higher is better)."""

    model: nn.Module
    task: Task
    metric: str = "accuracy"
    split: str = "val"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"metric: unknown {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.split == "test":
            raise ConfigError("split: the held-out selection split must not be 'test'; use 'val'")

    @classmethod
    def for_checkpoint(cls, path: str | Path, task: Task, metric: str | None = None) -> Scorer:
        """A scorer whose skeleton matches the checkpoint at `path`; the metric defaults to loss.

        Loss, not accuracy, by default: on small held-out sets accuracy ties are common, and a strict
        greedy soup would then reject every near-identical fine-tune.
        """
        metric = metric or "loss"
        return cls(skeleton(path, task), task, metric)

    def metrics(self, state: Mapping[str, torch.Tensor], split: str) -> dict[str, float]:
        """Loss, accuracy and count of `state` on `split`."""
        self.model.load_state_dict(dict(state), strict=True)
        return evaluate(self.model, self.task, split)

    def value(self, metrics: Mapping[str, float]) -> float:
        """The selection score of some metrics: accuracy, or negated loss."""
        return metrics["accuracy"] if self.metric == "accuracy" else -metrics["loss"]

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        """The held-out score of `state` (higher is better)."""
        return self.value(self.metrics(state, self.split))
