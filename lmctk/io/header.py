"""Safetensors headers: parse and validate the 8-byte length and JSON header, reading no tensor data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmctk.errors import CorruptCheckpointError, UnknownFormatError
from lmctk.io.info import TensorInfo, dtype_name

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def corrupt(file: Path, problem: str) -> CorruptCheckpointError:
    """The error for a damaged checkpoint file, with the remedy."""
    return CorruptCheckpointError(f"{file}: {problem}; the file is damaged, re-download or re-save it")


def read_header(file: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """The tensors and metadata a .safetensors file declares, checked against the file's size.

    Raises CorruptCheckpointError for a bad header length, a non-JSON header, malformed entries, or
    data shorter than the header says (a truncated file).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(file, f"only {size} bytes, too short for a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise corrupt(file, f"header length {length} exceeds the file size {size} (truncated or not safetensors)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise corrupt(file, f"header is not valid JSON ({exc})") from exc
    except RecursionError:
        raise corrupt(file, "header JSON is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise corrupt(file, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(file, "header __metadata__ is not a map of strings")
    data_size = size - 8 - length
    return [_entry(file, name, spec, data_size, 8 + length) for name, spec in header.items()], metadata


def _entry(file: Path, name: str, spec: object, data_size: int, start: int) -> TensorInfo:
    try:
        code, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise corrupt(file, f"tensor {name} has a malformed header entry {spec!r:.80}") from None
    if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)) or begin > end:
        raise corrupt(file, f"tensor {name} has a malformed header entry {spec!r:.80}")
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise UnknownFormatError(
            f"{file}: tensor {name} has dtype {code!r}, which lmctk does not read; "
            "re-save it as float32/bfloat16/float16"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise corrupt(file, f"tensor {name} spans {end - begin} bytes but shape {shape} of {code} needs {nbytes}")
    if end > data_size:
        raise corrupt(file, f"tensor {name} ends at data byte {end} but the file holds only {data_size} (truncated)")
    return TensorInfo(name, shape, dtype_name(dtype), nbytes, file, start + begin)
