"""Where a checkpoint's tensors live: resolve run dirs, detect the format, map tensors to files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmctk.errors import (
    CorruptCheckpointError,
    KeyMismatchError,
    LmctkError,
    UnknownFormatError,
)
from lmctk.io.paths import input_path

_STEP_DIR = re.compile(r"step(\d{8})")
_DIR_FILES = {  # in the order transformers prefers them
    "model.safetensors": "hf-safetensors",
    "model.safetensors.index.json": "hf-sharded-safetensors",
    "pytorch_model.bin": "hf-bin",
    "pytorch_model.bin.index.json": "hf-sharded-bin",
}
_FILE_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}
_REMEDY = "re-download or re-save the checkpoint"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself, or for an lmctk run dir (`manifest.json` + `checkpoints/`) its latest checkpoint dir.

    The latest is `checkpoints/stepNNNNNNNN/` with the highest step. Raises MissingPathError for a
    missing path and UnknownFormatError for a run dir without checkpoints, a symlink loop or a path
    that is not a regular file or dir.
    """
    path = input_path(path, "checkpoint path")
    checkpoints = path / "checkpoints"
    if not ((path / "manifest.json").is_file() and checkpoints.is_dir()):
        return path
    steps = {int(m[1]): d for d in checkpoints.iterdir() if (m := _STEP_DIR.fullmatch(d.name)) and d.is_dir()}
    if not steps:
        raise UnknownFormatError(
            f"{path}: run dir has no checkpoints/stepNNNNNNNN/ dirs yet; train (or resume) it until it saves one"
        )
    return steps[max(steps)]


@dataclass(frozen=True)
class Layout:
    """A located checkpoint: its format, weight files, and for sharded dirs the index's tensor -> file map."""

    path: Path
    format: str
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, Path] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return "safetensors" in self.format

    def plan(self, keys: Iterable[str] | None) -> list[tuple[Path, list[str] | None]]:
        """The files to read and the tensor names wanted from each (None: everything in the file)."""
        wanted = None if keys is None else list(dict.fromkeys(keys))
        if self.index is None:
            return [(file, wanted) for file in self.files]
        unknown = [k for k in wanted or () if k not in self.weight_map]
        if unknown:
            raise missing_keys(self.path, unknown)
        groups: dict[Path, list[str]] = {}
        for name in self.weight_map if wanted is None else wanted:
            groups.setdefault(self.weight_map[name], []).append(name)
        return list(groups.items())

    def absent(self, file: Path, names: list[str]) -> LmctkError:
        """The error for tensors a plan wanted from `file` that it does not hold."""
        if self.index is None:
            return missing_keys(file, names)
        return CorruptCheckpointError(
            f"{file}: lacks {', '.join(names[:3])} that {self.index.name} maps to it; {_REMEDY}"
        )


def missing_keys(path: Path, names: list[str]) -> KeyMismatchError:
    """The error for requested tensor names a checkpoint does not have."""
    return KeyMismatchError(
        f"{path}: has no tensor named {', '.join(names[:3])} ({len(names)} requested key(s) missing); "
        "list its tensors with inspect_checkpoint"
    )


def locate(path: str | os.PathLike) -> Layout:
    """Find the weight files of a checkpoint file, HF model dir, or run dir (via resolve_checkpoint)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        for name, fmt in _DIR_FILES.items():
            if (path / name).is_file():
                return _read_index(path / name, fmt) if name.endswith(".json") else Layout(path, fmt, (path / name,))
        raise UnknownFormatError(
            f"{path}: no checkpoint in this dir; looked for {', '.join(_DIR_FILES)} "
            "or an lmctk run dir (manifest.json + checkpoints/)"
        )
    fmt = _FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UnknownFormatError(
            f"{path}: unknown checkpoint extension {path.suffix or '(none)'!r}; expected "
            f"{', '.join(_FILE_FORMATS)}, an HF model dir or an lmctk run dir"
        )
    return Layout(path, fmt, (path,))


def _read_index(index: Path, fmt: str) -> Layout:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        shard_of, metadata = data["weight_map"], data.get("metadata") or {}
        valid = isinstance(shard_of, dict) and bool(shard_of) and isinstance(metadata, dict)
        valid = valid and all(isinstance(s, str) and Path(s).name == s for s in shard_of.values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        valid = False
    if not valid:
        raise CorruptCheckpointError(
            f"{index}: not a valid shard index (a JSON object with a 'weight_map' of tensor -> shard file name); "
            + _REMEDY
        )
    weight_map = {name: index.parent / shard for name, shard in shard_of.items()}
    files = tuple(dict.fromkeys(weight_map.values()))
    for file in files:
        try:
            input_path(file, f"shard named by {index.name}")
        except LmctkError as exc:
            raise CorruptCheckpointError(f"{exc}; {_REMEDY}") from None
        if file.is_dir():
            raise CorruptCheckpointError(f"{file}: shard named by {index.name} is a dir; {_REMEDY}")
    return Layout(index.parent, fmt, files, index, weight_map, metadata)
