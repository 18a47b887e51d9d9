"""Header-only inspection: what a checkpoint holds without reading its tensor data."""

from __future__ import annotations

import os

from lmctk.io.header import read_header
from lmctk.io.info import CheckpointInfo, TensorInfo, natural_key
from lmctk.io.layout import locate
from lmctk.io.torchfile import load_torch_state


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Names, shapes, dtypes and bytes of a checkpoint's tensors, sorted by name (`h.2` before `h.10`).

    Safetensors files and shards: only the 8-byte length and JSON header of each are read. Torch
    files (.pt/.bin) have no header: they are opened with torch.load(weights_only=True, mmap=True),
    which unpickles the structure but leaves tensor data on disk (legacy non-zip files are read whole).
    """
    layout = locate(path)
    tensors: list[TensorInfo] = []
    file_metadata: dict = {}
    for file, names in layout.plan(None):
        if layout.is_safetensors:
            found, meta = read_header(file)
        else:
            state, meta = load_torch_state(file, mmap=True)
            found = [TensorInfo.of(name, tensor, file) for name, tensor in state.items()]
        if names is not None:
            by_name = {t.name: t for t in found}
            absent = [n for n in names if n not in by_name]
            if absent:
                raise layout.absent(file, absent)
            found = [by_name[n] for n in names]
        tensors.extend(found)
        file_metadata.update(meta)
    tensors.sort(key=lambda t: natural_key(t.name))
    return CheckpointInfo(layout.path, layout.format, tensors, {**file_metadata, **layout.metadata})
