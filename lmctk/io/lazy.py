"""A checkpoint read one tensor at a time: `TensorReader` (located once) and `LazyState`, its mapping view.

`LazyState(path)` knows every name and shape from the headers and reads a tensor only when it is
indexed (nothing is cached), so weight matching of checkpoints larger than memory holds about one
layer per model at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmctk.io.header import corrupt
from lmctk.io.inspect import inspect_checkpoint
from lmctk.io.layout import locate, resolve_checkpoint
from lmctk.io.read import require_finite
from lmctk.io.torchfile import load_torch_state


class TensorReader:
    """Reads one tensor at a time from a checkpoint, located once (index and shards read at construction).

    Safetensors files are opened per read and closed, so pages of earlier tensors do not stay resident.
    Torch files (.pt/.bin, sharded or not) have no random access: each is memory-mapped once and kept.
    Every tensor returned is the caller's own (never a view of a cached state), so it may be changed in place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.layout = locate(path)
        self.file_of = self.layout.weight_map
        self._torch: dict[Path, dict[str, torch.Tensor]] = {}

    def where(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        return self.file_of.get(name, self.layout.files[0])

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from its file (not checked for NaN/Inf: see `require_finite`)."""
        file = self.where(name)
        if not self.layout.is_safetensors:
            if file not in self._torch:
                self._torch[file] = load_torch_state(file, mmap=True)[0]
            if name not in self._torch[file]:
                raise self.layout.absent(file, [name])
            return self._torch[file][name].clone()
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except SafetensorError as exc:
            raise corrupt(file, f"safetensors cannot read {name} ({exc})") from exc


class LazyState(Mapping[str, torch.Tensor]):
    """Tensors of a checkpoint read on access (and checked for NaN/Inf); `shapes` and `dtypes` come from the headers."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        self.path = resolve_checkpoint(path)
        info = inspect_checkpoint(self.path)
        self.shapes = {t.name: tuple(t.shape) for t in info.tensors}
        self.dtypes = {t.name: getattr(torch, t.dtype) for t in info.tensors}
        self.device = torch.device(device)
        self._reader = TensorReader(self.path)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        tensor = self._reader.get(key)
        require_finite(self._reader.where(key), key, tensor)
        return tensor.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def state_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a state's tensors, from headers for a LazyState or a view of one (no tensor is read)."""
    if isinstance(getattr(state, "shapes", None), Mapping):
        return dict(state.shapes)
    return {k: tuple(v.shape) for k, v in state.items()}


def state_device(state: Mapping[str, Any]) -> torch.device:
    """The device a state's tensors live on (a LazyState's, or a view's, target device)."""
    if isinstance(getattr(state, "device", None), torch.device):
        return state.device
    return next(iter(state.values())).device
