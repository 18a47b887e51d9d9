"""A checkpoint read one tensor at a time: `TensorReader` (located once) and `LazyState`, its mapping view.

`LazyState(path)` knows every name and shape from the headers and reads a tensor only when it is
indexed (no tensor is cached; file handles and headers are), so weight matching of checkpoints larger than memory holds about one
layer per model at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lmctk.io.header import read_header
from lmctk.io.info import TensorInfo
from lmctk.io.inspect import inspect_checkpoint
from lmctk.io.layout import locate, resolve_checkpoint
from lmctk.io.read import read_tensor, require_finite
from lmctk.io.torchfile import load_torch_state


class TensorReader:
    """Reads one tensor at a time from a checkpoint, located once (index and shards read at construction).

    Safetensors files are opened once (on first use) and kept open with their parsed headers; a read
    copies the tensor's bytes straight into a fresh tensor (no memory map, so the pages of earlier
    tensors never count as resident). Torch files (.pt/.bin) have no random access: each is
    memory-mapped once and kept. Every tensor returned is the caller's own, so it may be changed in place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.layout = locate(path)
        self.file_of = self.layout.weight_map
        self._torch: dict[Path, dict[str, torch.Tensor]] = {}
        self._open: dict[Path, tuple[BinaryIO, dict[str, TensorInfo]]] = {}

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
        if file not in self._open:
            self._open[file] = (open(file, "rb"), {t.name: t for t in read_header(file)[0]})  # noqa: SIM115
        handle, entries = self._open[file]
        if name not in entries:
            raise self.layout.absent(file, [name])
        return read_tensor(handle, entries[name])


class LazyState(Mapping[str, torch.Tensor]):
    """Tensors of a checkpoint read on access, each checked for NaN/Inf on its first read only;
    `shapes` and `dtypes` come from the headers."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        self.path = resolve_checkpoint(path)
        info = inspect_checkpoint(self.path)
        self.shapes = {t.name: tuple(t.shape) for t in info.tensors}
        self.dtypes = {t.name: getattr(torch, t.dtype) for t in info.tensors}
        self.device = torch.device(device)
        self._reader = TensorReader(self.path)
        self._checked: set[str] = set()
        self.read_seconds = 0.0  # spent reading and checking, for benchmarks

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        start = time.perf_counter()
        tensor = self._reader.get(key)
        if key not in self._checked:
            require_finite(self._reader.where(key), key, tensor)
            self._checked.add(key)
        self.read_seconds += time.perf_counter() - start
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


def is_lazy(state: Mapping[str, Any]) -> bool:
    """Whether a state reads its tensors from disk on access (a LazyState, or a view of one)."""
    while not isinstance(state, LazyState) and isinstance(getattr(state, "state", None), Mapping):
        state = state.state
    return isinstance(state, LazyState)


def state_device(state: Mapping[str, Any]) -> torch.device:
    """The device a state's tensors live on (a LazyState's, or a view's, target device)."""
    if isinstance(getattr(state, "device", None), torch.device):
        return state.device
    return next(iter(state.values())).device
