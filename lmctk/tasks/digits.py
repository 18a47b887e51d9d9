"""The `digits` task: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from lmctk.errors import ConfigError
from lmctk.seeding import derive_seed
from lmctk.tasks.classification import TensorClassification

FRACTIONS = {"val": 0.1, "test": 0.2}  # the rest (70%) is train


def _digits_csv() -> Path:
    """The CSV behind `sklearn.datasets.load_digits`, found without importing scikit-learn (~1 s)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError("task 'digits' needs scikit-learn's bundled data; pip install scikit-learn")
    return path


def stratified_split(labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Sorted example indices per split, taking the same fraction of every class."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val, n_test = (round(FRACTIONS[s] * len(members)) for s in ("val", "test"))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: torch.cat(chunks).sort().values for split, chunks in parts.items()}


def digits() -> TensorClassification:
    """Digits as (1, 8, 8) images scaled to [0, 1], then standardised by the training mean and std.

    The stratified 70/10/20 train/val/test split is fixed, so every run sees the same split. One
    scalar mean/std (not per pixel): border pixels are constant and would divide by zero.
    """
    data = torch.from_numpy(np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float32))
    images, labels = (data[:, :-1] / 16.0).reshape(-1, 1, 8, 8), data[:, -1].long()
    index = stratified_split(labels, derive_seed("digits", "split"))
    train = images[index["train"]]
    mean, std = train.mean(), train.std()
    splits = {split: ((images[i] - mean) / std, labels[i]) for split, i in index.items()}
    return TensorClassification("digits", splits, num_classes=10)
