"""What a checkpoint holds (names, shapes, dtypes, bytes per tensor), as values that render themselves."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from lmctk.io.sizes import format_bytes


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype, e.g. 'float32'."""
    return str(dtype).removeprefix("torch.")


def layer_prefix(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric component, else its first component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders `h.2` before `h.10`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its checkpoint declares it; `file` is the file (or shard) that holds it and, for
    safetensors, `offset` the byte where its data starts (-1: not known without loading)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: Path
    offset: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, file: Path) -> TensorInfo:
        """Describe an (unread, e.g. memory-mapped) tensor without touching its data."""
        return cls(name, tuple(tensor.shape), dtype_name(tensor.dtype), tensor.numel() * tensor.element_size(), file)


@dataclass
class CheckpointInfo:
    """A checkpoint's tensors from its headers; prints as a per-layer table with rich."""

    path: Path
    format: str
    tensors: list[TensorInfo]
    metadata: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def group_by_layer(self) -> dict[str, list[TensorInfo]]:
        """Tensors grouped by `layer_prefix`, layers in the order they first appear."""
        groups: dict[str, list[TensorInfo]] = {}
        for t in self.tensors:
            groups.setdefault(layer_prefix(t.name), []).append(t)
        return groups

    def to_dict(self) -> dict:
        """A JSON-serialisable form (paths as strings, shapes as lists)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "num_params": self.num_params,
            "total_bytes": self.total_bytes,
            "metadata": self.metadata,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes, "file": str(t.file)}
                for t in self.tensors
            ],
        }

    def __rich__(self) -> Table:
        table = Table(title=f"{self.path} ({self.format})")
        for column in ("layer", "tensors", "params", "dtypes", "bytes"):
            table.add_column(column, justify="left" if column in ("layer", "dtypes") else "right")
        for layer, tensors in self.group_by_layer().items():
            table.add_row(*_row(layer, tensors))
        table.add_section()
        table.add_row(*_row("total", self.tensors), style="bold")
        return table


def _row(label: str, tensors: list[TensorInfo]) -> tuple[str, ...]:
    dtypes = ", ".join(sorted({t.dtype for t in tensors}))
    params = sum(t.numel for t in tensors)
    return label, str(len(tensors)), f"{params:,}", dtypes, format_bytes(sum(t.nbytes for t in tensors))
