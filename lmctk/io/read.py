"""Reading a flat state (name -> tensor) from any checkpoint lmctk understands, without running pickle code."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from lmctk.errors import ConfigError, NonFiniteError
from lmctk.io.header import corrupt, read_header
from lmctk.io.info import TensorInfo
from lmctk.io.layout import locate
from lmctk.io.torchfile import load_torch_state


def load_state(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    check_finite: bool = True,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a state from a .safetensors/.pt/.pth/.bin file, an HF model dir (sharded or not) or a run dir.

    `keys` reads only those tensors (lazily for safetensors). `dtype` casts floating-point tensors only
    (integer buffers keep theirs). `check_finite` raises NonFiniteError naming the file and key.
    """
    cast = _as_dtype(dtype)
    layout = locate(path)
    state: dict[str, torch.Tensor] = {}
    for file, names in layout.plan(keys):
        part = _read_safetensors(file, names) if layout.is_safetensors else _read_torch(file, names)
        absent = [n for n in names or () if n not in part]
        if absent:
            raise layout.absent(file, absent)
        for name, tensor in part.items():
            tensor = tensor.to(device=device, dtype=cast if tensor.is_floating_point() else None)
            if check_finite:
                require_finite(file, name, tensor)
            state[name] = tensor
    return state


def _read_safetensors(file: Path, names: list[str] | None) -> dict[str, torch.Tensor]:
    declared = {t.name: t for t in read_header(file)[0]}  # checked: offsets inside the file, spans match shapes
    wanted = list(declared) if names is None else [n for n in names if n in declared]
    with open(file, "rb") as handle:
        return {name: read_tensor(handle, declared[name]) for name in wanted}


def read_tensor(handle: BinaryIO, entry: TensorInfo) -> torch.Tensor:
    """The tensor `entry` describes, its bytes read from `handle` into a new tensor: one copy, no memory map, so
    the pages of tensors read earlier never count as resident (a mapped file's touched pages do)."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < entry.nbytes:
        got = os.preadv(handle.fileno(), [view[done:]], entry.offset + done)
        if got <= 0:
            raise corrupt(entry.file, f"tensor {entry.name} ends past the end of the file (truncated)")
        done += got
    return raw.view(getattr(torch, entry.dtype)).reshape(entry.shape)


def _read_torch(file: Path, names: list[str] | None) -> dict[str, torch.Tensor]:
    state = load_torch_state(file, mmap=names is not None)[0]  # mmap: read only the wanted tensors
    return state if names is None else {n: state[n] for n in names if n in state}


_CHECK_CHUNK = 1 << 22


def require_finite(file: Path, name: str, tensor: torch.Tensor) -> None:
    """Raise NonFiniteError naming `file` and `name` if the float tensor holds NaN or Inf."""
    if tensor.is_floating_point() or tensor.is_complex():
        flat = tensor.reshape(-1)  # checked in chunks: isfinite's temporaries would double a large tensor
        n_bad = 0
        for start in range(0, flat.numel(), _CHECK_CHUNK):
            part = flat[start:start + _CHECK_CHUNK]
            n_bad += int((~torch.isfinite(part if part.element_size() > 1 else part.float())).sum())  # float8: no kernel
        if n_bad:
            raise NonFiniteError(file, name, n_bad)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    found = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ConfigError(f"dtype: {dtype!r} is not a torch floating-point dtype; use e.g. 'float32' or 'bfloat16'")
    return found
