"""Append-only JSONL journals that survive a kill at any moment: one locked, fsynced write per record.

A kill mid-write leaves at most a torn (unterminated) last line. Readers skip it; the next append
cuts it off first, so the torn bytes never swallow a finished record or turn into a corrupt middle
line. Any other line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmctk.errors import ConfigError
from lmctk.io.atomic import atomic_write_bytes

_CHUNK = 1 << 16


def append_journal(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line in a single O_APPEND write, fsynced before returning.

    An exclusive lock makes "cut a torn last line, then append" atomic, so several writers (ranks)
    can share one journal.
    """
    data = memoryview((json.dumps(record, sort_keys=True) + "\n").encode())
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, _complete_size(fd))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _complete_size(fd: int) -> int:
    """The length of the file up to and including its last newline (drops a torn last line)."""
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - _CHUNK)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL journal (none if it does not exist), skipping a torn last line."""
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:  # not JSON, or a UTF-8 sequence cut by the kill
            if i == len(lines) - 1:  # unterminated: the last line of a killed writer
                return
            raise ConfigError(f"{path}: line {i + 1} is not JSON; the journal is damaged, remove it to start over") from None


def rewrite_journal(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the journal with `records` atomically (a resume drops records of work it redoes)."""
    atomic_write_bytes(path, b"".join((json.dumps(r, sort_keys=True) + "\n").encode() for r in records))
