"""The Task protocol and what every task shares: batches, the loss and metrics, evaluation, data order.

A task holds a fixed evaluation set per split and a training stream addressed by example indices;
`DataOrder` turns (seed, step) into those indices, so training data order is a pure function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmctk.errors import ConfigError
from lmctk.seeding import derive_seed

SPLITS = ("train", "val", "test")
KINDS = ("classification", "causal_lm", "masked_lm")
IGNORE_INDEX = -100


@dataclass
class Batch:
    """Model keyword inputs and targets (class ids [B], next-token ids [B, T-1], or MLM labels [B, T])."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`."""
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.targets.to(device))

    def select(self, index: torch.Tensor | slice) -> Batch:
        """The examples at `index` (a slice or a LongTensor of positions)."""
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.targets[index])

    def __len__(self) -> int:
        return self.targets.shape[0]


class Task(Protocol):
    """What a model is trained and evaluated on (docs/ARCHITECTURE.md). Sums in `score` aggregate across batches."""

    name: str
    kind: str
    num_train: int

    def model_options(self) -> dict[str, Any]: ...

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator) -> Batch: ...

    def eval_batches(
        self, split: str = "test", device: torch.device | str = "cpu", batch_size: int | None = None
    ) -> list[Batch]: ...

    def logits(self, output: Any) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]: ...


TASK_ATTRIBUTES = (
    "name",
    "kind",
    "num_train",
    "model_options",
    "train_batch",
    "eval_batches",
    "logits",
    "loss",
    "score",
)


class TaskBase(ABC):
    """Shared task machinery: kind-aware cross-entropy loss and scores, and cached eval batches.

    Subclasses set `name`, `kind`, `num_train` and implement `model_options`, `train_batch` and
    `eval_split(split) -> Batch` (the whole fixed split on the CPU). User tasks may subclass it.
    """

    name: str
    kind: str
    num_train: int

    def __init__(self) -> None:
        self._eval_cache: dict[tuple[str, str, int | None], list[Batch]] = {}

    @abstractmethod
    def eval_split(self, split: str) -> Batch:
        """The whole fixed evaluation set of `split` as one batch (each task defines its own)."""

    def eval_batches(
        self, split: str = "test", device: torch.device | str = "cpu", batch_size: int | None = None
    ) -> list[Batch]:
        """The fixed eval set of `split` on `device` in batches of `batch_size` (None: one batch); cached."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; give a positive eval batch size or None")
        key = (split, str(torch.device(device)), batch_size)
        if key not in self._eval_cache:
            whole = self.eval_split(split).to(device)
            step = batch_size or len(whole)
            self._eval_cache[key] = [whole.select(slice(i, i + step)) for i in range(0, len(whole), step)]
        return self._eval_cache[key]

    def logits(self, output: Any) -> torch.Tensor:
        return output_logits(output)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over examples or scored tokens (targets of -100 are not scored)."""
        flat_logits, targets = scored_pairs(self.kind, logits, batch)
        return F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums for aggregation: NLL (summed in float64), correct argmax predictions, and scored count."""
        flat_logits, targets = scored_pairs(self.kind, logits, batch)
        scored = targets != IGNORE_INDEX
        nll = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        return {
            "loss_sum": nll.double().sum(),
            "correct": ((flat_logits.argmax(-1) == targets) & scored).sum(),
            "count": scored.sum(),
        }


def scored_pairs(kind: str, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (logits, targets) pairs of a task of `kind`; causal LM logits at position t predict token t+1.

    Targets of IGNORE_INDEX are kept (callers mask them), so pairs line up across models.
    """
    if kind == "causal_lm":
        logits = logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1)


def output_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: `ModelOutput.logits` for HF models, else the tensor itself."""
    return getattr(output, "logits", output)


def forward(model: nn.Module, batch: Batch, task: Task | None = None) -> torch.Tensor:
    """Run `model` on `batch` and return logits: the one place a model meets a batch."""
    output = model(**batch.inputs)
    return task.logits(output) if task is not None else output_logits(output)


def evaluate(
    model: nn.Module,
    task: Task,
    split: str = "test",
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Mean loss (NLL per example or scored token), accuracy and count of `model` on a fixed split.

    Runs without gradients in eval mode and restores the model's previous mode afterwards.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            totals: dict[str, torch.Tensor] = {}
            for batch in task.eval_batches(split, device, batch_size):
                for key, value in task.score(forward(model, batch, task), batch).items():
                    totals[key] = totals.get(key, 0) + value.double()
    finally:
        model.train(was_training)
    count = int(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "count": count,
    }


class DataOrder:
    """The training sampler: epoch-wise shuffling without replacement, a pure function of (seed, step).

    Epoch e is `randperm(num_train)` under `derive_seed(seed, "epoch", e)`; each epoch drops its last
    partial batch, so step s reads batch s % steps_per_epoch of epoch s // steps_per_epoch.
    """

    def __init__(self, num_train: int, seed: int, batch_size: int) -> None:
        if not 1 <= batch_size <= num_train:
            raise ConfigError(
                f"batch_size={batch_size} with {num_train} training examples; "
                f"choose a batch size between 1 and {num_train}"
            )
        self.num_train = num_train
        self.seed = seed
        self.batch_size = batch_size
        self.steps_per_epoch = num_train // batch_size
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of all training indices in `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._cached = (epoch, torch.randperm(self.num_train, generator=generator))
        return self._cached[1]

    def indices(self, step: int) -> torch.Tensor:
        """The training example indices of the batch at `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]
