"""Torch files (.pt/.pth/.bin) without running pickled code: weights_only loading and the state inside."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from lmctk.errors import UnknownFormatError
from lmctk.io.header import corrupt

_STATE_KEYS = ("state_dict", "model")


def load_torch_state(file: Path, *, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The flat state in a torch file and metadata (`state_key` when it was nested under one).

    Only `torch.load(weights_only=True, map_location="cpu")` runs, so no code from the file executes.
    A dict with a `state_dict` or `model` dict of tensors yields that; otherwise the file must hold a
    flat dict of tensors. `mmap=True` leaves tensor data on disk (zip-format files only).
    """
    try:
        obj = torch.load(file, weights_only=True, map_location="cpu", mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as exc:
        if not _is_pickle(file):  # not a pickle at all: damaged or not a torch file
            raise corrupt(file, f"torch.load cannot read it ({_unpickler_error(exc)})") from exc
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"a pickled {culprit[1]}" if culprit else _unpickler_error(exc)
        raise UnknownFormatError(
            f"{file}: contains code or objects that weights-only loading refuses ({what}); lmctk never runs "
            "pickled code: convert it to safetensors"
        ) from exc
    except Exception as exc:  # torch.load raises many types for damaged files; keep the cause chained
        raise corrupt(file, f"torch.load cannot read it ({_first_sentence(exc)})") from exc
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and _is_state(obj.get(key)):
            return obj[key], {"state_key": key}
    if _is_state(obj):
        return obj, {}
    raise UnknownFormatError(
        f"{file}: expected a dict of tensors (or one under 'state_dict'/'model') but found {_describe(obj)}; "
        "re-save it with torch.save(model.state_dict(), path)"
    )


def _is_pickle(file: Path) -> bool:
    """A torch zip archive or a legacy pickle (starts with the PROTO opcode)."""
    with open(file, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(f)


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _describe(obj: object) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    odd = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not _is_state({k: v})][:3]
    return f"a dict with entries that are not str -> tensor: {', '.join(odd)}"


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0].split(". ")[0]
    return text[:160] or type(exc).__name__


def _unpickler_error(exc: BaseException) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return match[1].split(". ")[0] if match else _first_sentence(exc)
