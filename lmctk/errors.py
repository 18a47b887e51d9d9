"""The lmctk error family: every message is one line that names the file, key or field and the remedy.

The CLI catches `LmctkError`, prints its message in one red line and exits 2 (no traceback unless
`--debug`). Library code raises these instead of bare exceptions so callers can catch one family.
"""

from __future__ import annotations

from collections.abc import Iterable


class LmctkError(Exception):
    """Base of all lmctk errors; `str(err)` is a single actionable line."""

    exit_code = 2


class MissingPathError(LmctkError, FileNotFoundError):
    """A path the user gave does not exist."""

    def __init__(self, path: object, what: str = "path") -> None:
        super().__init__(f"{path}: {what} does not exist; check the path")


class UnknownFormatError(LmctkError):
    """A path exists but is not a checkpoint format lmctk reads."""


class CorruptCheckpointError(LmctkError):
    """A checkpoint file is truncated, has a broken header, or an index names a broken shard."""


class KeyMismatchError(LmctkError):
    """Two states (or a state and a model) do not have the same keys."""

    @classmethod
    def between(
        cls, name_a: str, keys_a: Iterable[str], name_b: str, keys_b: Iterable[str], show: int = 3
    ) -> "KeyMismatchError":
        a, b = set(keys_a), set(keys_b)
        missing = sorted(a - b)
        extra = sorted(b - a)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from {name_b} (e.g. {', '.join(missing[:show])})")
        if extra:
            parts.append(f"{len(extra)} extra in {name_b} (e.g. {', '.join(extra[:show])})")
        return cls(
            f"{name_a} and {name_b} have different keys: {'; '.join(parts)}; "
            "compare checkpoints of the same architecture"
        )


class ShapeMismatchError(LmctkError):
    """A tensor has a different shape than its counterpart."""

    def __init__(self, key: str, shape_a: tuple, shape_b: tuple, where: str = "") -> None:
        loc = f" ({where})" if where else ""
        super().__init__(
            f"{key}: shape {tuple(shape_a)} vs {tuple(shape_b)}{loc}; "
            "the checkpoints come from different architectures or configs"
        )


class NonFiniteError(LmctkError):
    """Loaded weights contain NaN or Inf."""

    def __init__(self, path: object, key: str, n_bad: int) -> None:
        super().__init__(
            f"{path}: tensor {key} has {n_bad} NaN/Inf values; the checkpoint is diverged or "
            "corrupt (pass check_finite=False to load it anyway)"
        )


class OutputWriteError(LmctkError, OSError):
    """Writing an output failed (no space, read-only file system, a file where a dir must be)."""

    def __init__(self, path: object, exc: OSError) -> None:
        reason = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(f"{path}: cannot write the output ({reason}); free space or choose a writable --out")
        self.errno = exc.errno


class OutputExistsError(LmctkError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path}: output already exists; pass --overwrite (overwrite=True) to replace it")


class ConfigError(LmctkError, ValueError):
    """A bad option, field or name given by the user (task, model, recipe key, CLI value)."""


class BusyError(ConfigError):
    """Another lmctk process is writing the same output (it holds the output's lock)."""
