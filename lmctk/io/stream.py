"""Streaming writer: an HF model dir written tensor by tensor, shard by shard, resumable from a journal.

Every tensor is declared up front (name, shape, dtype), so each shard's safetensors header is known
before its data: the header is written first and each tensor's bytes are appended as soon as it is
produced, so no shard is ever buffered whole. The dir is built in `.NAME.partial` beside the target;
a journal there records each finished shard, so an interrupted write resumes without recomputing
them. The index is written last and the dir renamed into place: a complete-looking output is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmctk.errors import ConfigError, OutputExistsError
from lmctk.io.atomic import _commit, fsync_path, writing
from lmctk.io.header import _DTYPES
from lmctk.io.journal import append_journal, read_journal
from lmctk.io.layout import locate
from lmctk.io.sizes import parse_size
from lmctk.io.write import (
    metadata_with_format,
    plan_shards,
    shard_file_name,
    write_index,
)

JOURNAL = ".journal.jsonl"
_HEAD_BYTES = 1 << 16
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSlot:
    """A tensor the writer will receive: its name, shape and (output) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


ProduceFn = Callable[[str], torch.Tensor]
ProgressFn = Callable[[str, int, int], None]  # (tensor name, bytes written so far, total bytes)


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """Where an interrupted streaming write of `out_dir` keeps its finished shards and journal."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def stream_hf_dir(
    out_dir: str | os.PathLike,
    slots: Sequence[TensorSlot],
    produce: ProduceFn,
    *,
    shard_size: int | str = "2GB",
    files: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressFn | None = None,
    inputs: Sequence[str | os.PathLike] = (),
    finish: Callable[[Path], Mapping[str, bytes]] | None = None,
) -> Path:
    """Write an HF model dir whose tensors `produce(name)` computes one at a time, in `slots` order.

    `files` (name -> bytes: config.json, tokenizer files, README.md) are written beside the weights;
    `finish(dir)` may read the complete dir before it is committed and return more files (a model card
    with the output's scores), so the committed dir is whole. `resume=True` continues the interrupted
    write of the same plan from its journal (or starts afresh if none was begun), and only if the
    checkpoints `inputs` it is computed from are unchanged (see `input_fingerprints`). Raises
    OutputExistsError up front (nothing touched) if `out_dir` exists and not `overwrite`.
    """
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise OutputExistsError(out_dir)
    meta = metadata_with_format(metadata)
    by_name = {slot.name: slot for slot in slots}
    if len(by_name) != len(slots):
        raise ConfigError("slots: tensor names must be unique")
    unsupported = [s.name for s in slots if s.dtype not in _CODES]
    if unsupported:
        raise ConfigError(f"{unsupported[0]}: dtype {by_name[unsupported[0]].dtype} cannot be stored in safetensors")
    groups = plan_shards({s.name: s.nbytes for s in slots}, parse_size(shard_size))
    names = [shard_file_name(i, len(groups)) for i in range(1, len(groups) + 1)]
    headers = [_header([by_name[n] for n in group], meta) for group in groups]
    fingerprint = _fingerprint(names, headers, files or {})
    with writing(out_dir):
        tmp = partial_dir(out_dir)
        sources = input_fingerprints(inputs)
        resuming = resume and (tmp / JOURNAL).is_file()
        done = _resume(tmp, fingerprint, sources) if resuming else _fresh(tmp, fingerprint, sources)
        todo = [(name, [by_name[t] for t in group], header)
                for name, group, header in zip(names, groups, headers) if name not in done]
        total = sum(s.nbytes for s in slots)
        _write_shards(tmp, todo, produce, total - sum(s.nbytes for _, group, _ in todo for s in group), total, progress)
        _write_files(tmp, files or {})
        if len(groups) > 1:
            write_index(tmp, {t: name for name, group in zip(names, groups) for t in group}, total)
        if finish:
            _write_files(tmp, finish(tmp))
        (tmp / JOURNAL).unlink()
        fsync_path(tmp)
        _commit(tmp, out_dir, overwrite=overwrite)
    return out_dir


def _write_shards(tmp: Path, todo: list[tuple[str, list[TensorSlot], bytes]], produce: Callable[[str], torch.Tensor],
                  written: int, total: int, progress: ProgressFn | None) -> None:
    """Write each shard (header, then its tensors as `produce` computes them), fsync it, journal it."""
    for name, group, header in todo:
        with open(tmp / name, "wb") as f:
            f.write(header)
            for slot in group:
                _write_tensor(f, slot, produce(slot.name))
                written += slot.nbytes
                if progress:
                    progress(slot.name, written, total)
            f.flush()
            os.fsync(f.fileno())
        append_journal(tmp / JOURNAL, {"shard": name, "bytes": (tmp / name).stat().st_size})


def _write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).write_bytes(data)
        fsync_path(directory / name)


def _header(slots: Sequence[TensorSlot], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to 8 bytes) of one shard."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for slot in slots:
        header[slot.name] = {"dtype": _CODES[slot.dtype], "shape": list(slot.shape), "data_offsets": [offset, offset + slot.nbytes]}
        offset += slot.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(f, slot: TensorSlot, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
        raise ConfigError(
            f"{slot.name}: produced {tuple(tensor.shape)} {tensor.dtype}, but the plan declared {slot.shape} {slot.dtype}"
        )
    if tensor.numel():
        f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _fingerprint(names: list[str], headers: list[bytes], files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, header in zip(names, headers):
        h.update(name.encode() + b"\0" + header)
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def input_fingerprints(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """Per weight file (and shard index) of the checkpoints `paths`: a hash of its size, mtime_ns and
    first 64 KiB (a safetensors header), so a checkpoint replaced between a kill and a resume is noticed."""
    out = {}
    for path in paths:
        layout = locate(path)
        for file in (*layout.files, *([layout.index] if layout.index else [])):
            st = file.stat()
            with open(file, "rb") as f:
                head = f.read(_HEAD_BYTES)
            out[str(file)] = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode() + head).hexdigest()
    return out


def _fresh(tmp: Path, fingerprint: str, sources: dict[str, str]) -> set[str]:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    append_journal(tmp / JOURNAL, {"plan": fingerprint, "inputs": sources})
    return set()


def _resume(tmp: Path, fingerprint: str, sources: dict[str, str]) -> set[str]:
    """Shards the journal in `tmp` records as finished (and whose size still matches)."""
    journal = tmp / JOURNAL
    records = list(read_journal(journal))
    if not records or records[0].get("plan") != fingerprint:
        raise ConfigError(
            f"{tmp}: the interrupted write was for different inputs or options; drop --resume to start over"
        )
    before = records[0].get("inputs", {})
    changed = sorted(set(before) ^ set(sources) | {f for f in before.keys() & sources.keys() if before[f] != sources[f]})
    if changed:
        raise ConfigError(
            f"{changed[0]}: input changed since the interrupted write ({len(changed)} file(s) differ in size, "
            "time or header); resuming would mix old and new weights: drop --resume to start over"
        )
    return {r["shard"] for r in records[1:] if (tmp / r["shard"]).is_file() and (tmp / r["shard"]).stat().st_size == r["bytes"]}
