"""Advisory output locks: one lmctk process at a time writes a run dir or output dir.

The lock is `fcntl.flock` (non-blocking) on a hidden `.NAME.lock` file beside the target, so it
survives the target being replaced, and the kernel drops it when the holder dies (even by SIGKILL): a
stale lock file never blocks anyone. The file holds the holder's pid for the message and is removed on
release; a process that locked a file just removed retries on the new one.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmctk.errors import BusyError
from lmctk.io.atomic import writing


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file guarding `target`."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def locked(target: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock on `target` for the block; BusyError at once if another process has it."""
    path = lock_path(target)
    with writing(Path(target)):  # a file where the parent dir must be, a read-only mount: one line, not a traceback
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, target)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: nobody can hold a lock on a file about to go
        os.close(fd)


def _acquire(path: Path, target: object) -> int:
    """An fd of `path` holding its exclusive lock, or BusyError naming the holder's pid."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(f"{target}: in use by another lmctk process (pid {holder}); "
                            "wait for it to finish or stop it, then run again") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as we locked it: lock the current one
