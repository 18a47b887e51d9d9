"""Classification from in-memory tensors: the task behind `digits` and `synthetic`, usable by user tasks."""

from __future__ import annotations

from typing import Any

import torch

from lmctk.errors import ConfigError
from lmctk.tasks.base import SPLITS, Batch, TaskBase


class TensorClassification(TaskBase):
    """A classification task over fixed (inputs, labels) tensors per split.

    `splits` maps "train", "val" and "test" to (x [N, *in_shape], y [N]); the "train" eval split is
    the whole training set. Models receive `x=` and predict `num_classes` logits.
    """

    kind = "classification"

    def __init__(
        self, name: str, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int
    ) -> None:
        super().__init__()
        missing = set(SPLITS) - set(splits)
        if missing:
            raise ConfigError(
                f"task {name!r}: splits lack {', '.join(sorted(missing))}; give train, val and test"
            )
        self.name = name
        self.num_classes = num_classes
        self.splits = {key: Batch({"x": x.float()}, y.long()) for key, (x, y) in splits.items()}
        self.num_train = len(self.splits["train"])

    def model_options(self) -> dict[str, Any]:
        return {
            "in_shape": tuple(self.splits["train"].inputs["x"].shape[1:]),
            "num_classes": self.num_classes,
        }

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        return self.splits["train"].select(indices)

    def eval_split(self, split: str) -> Batch:
        return self.splits[split]
