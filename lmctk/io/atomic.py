"""Atomic output: build a file or directory beside its target, fsync it, then rename it into place.

Readers never see a half-written output: a crash leaves the old output (or nothing) plus a hidden
`.NAME.tmp-*` leftover. An existing output is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmctk.errors import LmctkError, OutputExistsError, OutputWriteError


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged(target: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp path beside `target` to write into; on success rename it to `target`.

    Raises OutputExistsError up front (target untouched) if `target` exists and not `overwrite`.
    On any error the temp output is removed and `target` is left as it was; an OSError becomes
    OutputWriteError.
    """
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise OutputExistsError(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _beside(target, "tmp")
        try:
            yield tmp
            _commit(tmp, target, overwrite=overwrite)
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn an OSError (disk full, read-only mount, a file where a dir must be) into OutputWriteError naming `target`."""
    try:
        yield
    except LmctkError:
        raise
    except OSError as exc:
        raise OutputWriteError(target, exc) from exc


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp + fsync + rename), replacing any existing file."""
    with staged(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically, e.g. a run's manifest or report JSON."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _beside(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _commit(tmp: Path, target: Path, *, overwrite: bool) -> None:
    exists = os.path.lexists(target)
    if exists and not overwrite:
        raise OutputExistsError(target)
    if exists and (tmp.is_dir() or target.is_dir()):
        aside = _beside(target, "old")
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _remove(aside)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def json_text(payload: object, *, indent: int | None = 2) -> str:
    """Strict JSON for machines: NaN and ±Inf become null (json.dumps would write bare NaN, which
    strict parsers reject); keys sorted so outputs diff cleanly."""
    return json.dumps(_finite(payload), indent=indent, sort_keys=True, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, payload: object) -> None:
    """Write `payload` as strict JSON (see `json_text`) atomically."""
    atomic_write_text(path, json_text(payload) + "\n")


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
