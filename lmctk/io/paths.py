"""Input paths: exist, and are a regular file or a directory (a FIFO or device would hang a read)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from lmctk.errors import MissingPathError, UnknownFormatError


def input_path(path: str | os.PathLike, what: str = "path") -> Path:
    """`path` as a Path once it is known to be a regular file or a directory (symlinks followed).

    Raises MissingPathError for a missing path or dangling symlink, UnknownFormatError for a symlink
    loop or anything else (FIFO, socket, device such as /dev/zero).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise MissingPathError(path, f"{what} is a symlink whose target") from None
        raise MissingPathError(path, what) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnknownFormatError(f"{path}: {what} is a symlink loop; point it at a real file or dir") from None
        raise UnknownFormatError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnknownFormatError(
            f"{path}: {what} is a {_kind(mode)}, not a regular file or dir; give a file or dir on disk"
        )
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
