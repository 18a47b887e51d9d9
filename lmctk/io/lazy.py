"""A checkpoint as a read-on-access mapping, for algorithms that touch one layer at a time.

`LazyState(path)` knows every name and shape from the headers and reads a tensor only when it is
indexed (nothing is cached), so weight matching of checkpoints larger than memory holds about one
layer per model at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lmctk.io.inspect import inspect_checkpoint
from lmctk.io.layout import resolve_checkpoint
from lmctk.io.read import load_state


class LazyState(Mapping[str, torch.Tensor]):
    """Tensors of a checkpoint read on access; `shapes` and `dtypes` come from the headers."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        self.path = resolve_checkpoint(path)
        info = inspect_checkpoint(self.path)
        self.shapes = {t.name: tuple(t.shape) for t in info.tensors}
        self.dtypes = {t.name: getattr(torch, t.dtype) for t in info.tensors}
        self.device = torch.device(device)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return load_state(self.path, keys=[key], device=self.device)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a state's tensors, from headers for a LazyState (no tensor is read)."""
    if isinstance(state, LazyState):
        return dict(state.shapes)
    return {k: tuple(v.shape) for k, v in state.items()}


def state_device(state: Mapping[str, Any]) -> torch.device:
    """The device a state's tensors live on (a LazyState's target device)."""
    if isinstance(state, LazyState):
        return state.device
    return next(iter(state.values())).device
