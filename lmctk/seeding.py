"""Stable seed derivation: one base seed names many independent random streams."""

from __future__ import annotations

import hashlib

_MASK_63 = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from a base seed and names, e.g. `derive_seed(seed, "epoch", 3)`.

    sha256 of the parts' repr, so streams (init, data, dropout, perturbation) are independent,
    identical across processes and Python versions (unlike `hash`), and valid for `manual_seed`.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK_63
