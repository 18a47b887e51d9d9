"""Byte sizes: parse user sizes ("2GB", "500MiB", 1000) and format byte counts for humans."""

from __future__ import annotations

import re

from lmctk.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: int | str, field: str = "shard_size") -> int:
    """Bytes in `size`: an int, or a number with KB/MB/GB (powers of 10) or KiB/MiB/GiB (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        unit = match and _UNITS.get(match[2].lower())
        if not unit:
            raise ConfigError(
                f"{field}: cannot parse size {size!r}; use an int of bytes or e.g. '2GB', '500MiB', '64KB'"
            )
        value = int(float(match[1]) * unit)
    if value <= 0:
        raise ConfigError(f"{field}: size {size!r} must be positive; use e.g. '2GB'")
    return value


def format_bytes(n: int) -> str:
    """`n` bytes as a short human string with binary units, e.g. '1.5 MiB'."""
    exponent = min(max(n.bit_length() - 1, 0) // 10, len(_BINARY) - 1)
    return f"{n} B" if exponent == 0 else f"{n / 1024**exponent:.1f} {_BINARY[exponent]}"
