"""Freed buffers given back to the operating system, so a memory budget holds over a long run.

glibc serves a large allocation with its own memory map (returned on free) only above a threshold that
it raises, up to 32 MiB, each time such a map is freed; after that, freed tensors of a few MiB stay in the
heap, fragment it and count as resident. On a Qwen2.5-0.5B alignment this added ~130 MiB to the peak and
kept ~160 MiB after weight matching had returned. Fixing the thresholds stops the drift.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def return_freed_buffers(threshold: int = 1 << 20) -> bool:
    """Make glibc map allocations of `threshold` bytes or more on their own and trim its heap above that,
    for the whole process. Returns False where the C library has no `mallopt` (musl, macOS): nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
