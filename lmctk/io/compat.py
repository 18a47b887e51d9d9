"""Same keys, same shapes: the one check behind every "can these states be combined?" question."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmctk.errors import ConfigError, KeyMismatchError, ShapeMismatchError
from lmctk.io.info import CheckpointInfo
from lmctk.io.lazy import state_shapes


def check_compatible(infos: Sequence[CheckpointInfo]) -> None:
    """Raise KeyMismatchError or ShapeMismatchError unless every checkpoint matches the first (headers only)."""
    if not infos:
        raise ConfigError("checkpoints: check_compatible needs at least one checkpoint")
    first, *rest = infos
    for other in rest:
        _require_same(
            str(first.path),
            {t.name: t.shape for t in first.tensors},
            str(other.path),
            {t.name: t.shape for t in other.tensors},
        )


def assert_same_keys(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str = "a", name_b: str = "b") -> None:
    """Raise KeyMismatchError (first few missing/extra keys) unless states `a` and `b` have the same keys."""
    _require_same(name_a, dict.fromkeys(a), name_b, dict.fromkeys(b))


def assert_same_shapes(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str = "a", name_b: str = "b") -> None:
    """Raise KeyMismatchError or ShapeMismatchError unless states `a` and `b` have the same keys and shapes."""
    _require_same(name_a, state_shapes(a), name_b, state_shapes(b))


def _require_same(
    name_a: str, shapes_a: Mapping[str, tuple | None], name_b: str, shapes_b: Mapping[str, tuple | None]
) -> None:
    if shapes_a.keys() != shapes_b.keys():
        raise KeyMismatchError.between(name_a, shapes_a, name_b, shapes_b)
    for key, shape in shapes_a.items():
        if shape != shapes_b[key]:
            raise ShapeMismatchError(key, shape, shapes_b[key], where=f"{name_a} vs {name_b}")
