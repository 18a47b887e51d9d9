"""Run directories: `manifest.json`, the append-only `metrics.jsonl` journal and `checkpoints/`.

A run dir is how every long job leaves its results: the manifest says what ran (config, versions,
git hash, seed), the journal holds one JSON record per event and survives a kill at any moment
(a torn last line is ignored on read), and checkpoints are HF-style dirs `checkpoints/stepNNNNNNNN/`.
The manifest is written first: a dir without one was never started (killed or failed before), and
its leftovers are cleared by the next `create` without asking for --overwrite.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmctk.errors import ConfigError, MissingPathError, OutputExistsError
from lmctk.io import atomic_write_text
from lmctk.io.journal import append_journal, read_journal, rewrite_journal
from lmctk.tasks import refuse_code

MANIFEST = "manifest.json"
JOURNAL = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint at `step` (zero padded so names sort by step)."""
    return f"step{step:08d}"


def git_hash() -> str | None:
    """The lmctk source tree's git commit, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Versions that decide whether a run can be reproduced bitwise."""
    import torch

    import lmctk

    env: dict[str, Any] = {
        "lmctk": lmctk.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "git": git_hash(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return env


class RunDir:
    """A run directory on disk; creation refuses an existing run unless asked to overwrite or resume."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False) -> "RunDir":
        """Start a new run at `path`; an existing non-empty dir needs `overwrite=True`."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            if not overwrite and not _unstarted(p):
                raise OutputExistsError(p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        (p / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        return cls(p)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """Open an existing run (for resume, reports or loading checkpoints)."""
        p = Path(path)
        if not p.exists():
            raise MissingPathError(p, "run directory")
        if not (p / MANIFEST).is_file():
            raise ConfigError(f"{p}: not a run directory (no {MANIFEST}); give the --out of a run")
        return cls(p)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.manifest_path}: broken JSON ({e.msg}); the run dir is damaged") from e

    def task(self, allow_code: bool | str = False) -> tuple[str, dict[str, Any]]:
        """The (task name, options) this training run used; a `module:function` task is refused unless
        `allow_code` (data never chooses code to run: the user names it with --task)."""
        config = self.manifest()["config"]
        name = config["task"]
        refuse_code(name, f"{self.manifest_path}: config.task",
                    f"name it yourself: --task {name} (API: task={name!r} or allow_code=True)", allow_code)
        return name, config.get("task_options") or {}

    def append(self, record: dict[str, Any]) -> None:
        """Append one record to the journal (see `lmctk.io.journal`: fsynced, safe for several ranks)."""
        append_journal(self.journal_path, record)

    def records(self) -> list[dict[str, Any]]:
        """All complete journal records in order; a torn final line (a kill mid-write) is skipped."""
        return list(read_journal(self.journal_path))

    def keep_records(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop the journal records `keep(record)` rejects (a resume redoes the work they record)."""
        records = self.records()
        kept = [r for r in records if keep(r)]
        if len(kept) != len(records):
            rewrite_journal(self.journal_path, kept)

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(step)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with a model file), ascending."""
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        steps = []
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit():
                if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
                    steps.append(int(d.name[4:]))
        return sorted(steps)


def _unstarted(path: Path) -> bool:
    """A dir holding only what a run killed before its manifest leaves (checkpoints/, the journal)."""
    return path.is_dir() and all(
        e.name in (CHECKPOINTS, JOURNAL) or e.name.startswith(f".{MANIFEST}.") for e in path.iterdir()
    )


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
