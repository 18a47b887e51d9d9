"""Inputs of a convergence analysis: runs (seed dirs) and their checkpoint steps, token classes and counts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmctk.errors import ConfigError, MissingPathError
from lmctk.tasks import Task
from lmctk.tasks.tokens import read_int_file

_STEP_NAME = re.compile(r"(?:step|checkpoint-)(\d+)")
OTHER_CLASS = "other"


@dataclass
class Run:
    """One seed's checkpoints over training: step -> checkpoint dir."""

    path: Path
    checkpoints: dict[int, Path]

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """An lmctk run dir (manifest + checkpoints/stepNNNNNNNN) or a dir of HF dirs named `step<N>`
        or `checkpoint-<N>` (as multi-seed suites publish them). Steps are found from names alone;
        no weights are read until a step is evaluated."""
        path = Path(path)
        if not path.is_dir():
            raise MissingPathError(path, "run directory")
        if (path / "manifest.json").is_file():
            from lmctk.rundir import RunDir

            run = RunDir.open(path)
            return cls(path, {s: run.checkpoint_dir(s) for s in run.checkpoint_steps()})
        steps = {int(m[1]): d for d in path.iterdir() if d.is_dir() and (m := _STEP_NAME.fullmatch(d.name))}
        if not steps:
            raise ConfigError(
                f"{path}: no checkpoints found; give an lmctk run dir or a dir of step<N>/ HF model dirs"
            )
        return cls(path, steps)


def common_steps(runs: Sequence[Run], wanted: Sequence[int] | None = None) -> tuple[list[int], dict[str, list[int]]]:
    """Steps present in every run (restricted to `wanted`), and per run the steps it lacks that
    another run has (reported, never guessed)."""
    every = set.union(*(set(r.checkpoints) for r in runs))
    shared = set.intersection(*(set(r.checkpoints) for r in runs))
    missing = {str(r.path): sorted(every - set(r.checkpoints)) for r in runs}
    if wanted is not None:
        absent = sorted(set(wanted) - shared)
        if absent:
            raise ConfigError(
                f"--steps: step {absent[0]} is not in every run; common steps: {', '.join(map(str, sorted(shared)))}"
            )
        shared = set(wanted)
    if not shared:
        raise ConfigError("the runs share no checkpoint step; give runs saved at the same steps")
    return sorted(shared), {k: v for k, v in missing.items() if v}


def load_classes(path: str | Path, task: Task) -> tuple[torch.Tensor, list[str]]:
    """Token classes from a file: JSON {"token": "class"} or lines `token<TAB>class`.

    A token is its text (as the task decodes a single id) or `id:<N>`. Tokens not listed are class
    "other". Returns the class index of every vocabulary id and the class names.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(path, "token-class file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: expected a JSON object mapping token to class ({e})") from None
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            token, sep, cls = line.rpartition("\t")
            if not sep:
                raise ConfigError(f"{path}:{n}: expected 'token<TAB>class'")
            pairs.append((token, cls.strip()))
    vocab = _vocab_size(task)
    decode = getattr(task, "decode", None)
    by_text: dict[str, int] = {}
    if decode is not None:
        for i in range(vocab):
            by_text.setdefault(decode(torch.tensor([i])), i)
    names = [OTHER_CLASS]
    labels = torch.zeros(vocab, dtype=torch.long)
    for token, cls in pairs:
        if token.startswith("id:") and token[3:].isdigit():
            idx = int(token[3:])
        elif token in by_text:
            idx = by_text[token]
        else:
            raise ConfigError(f"{path}: token {token!r} is not a single token of task {task.name!r}; "
                              "write it as the task decodes it or as id:<N>")
        if idx >= vocab:
            raise ConfigError(f"{path}: token id {idx} is outside the vocabulary ({vocab})")
        if cls not in names:
            names.append(cls)
        labels[idx] = names.index(cls)
    return labels, names


def _vocab_size(task: Task) -> int:
    options = task.model_options()
    for key in ("vocab_size", "num_classes", "classes"):
        if key in options:
            return int(options[key])
    raise ConfigError(f"task {task.name!r}: no vocab_size in model_options(); token strata need one")


def train_counts(task: Task) -> torch.Tensor | None:
    """Count of every token id in the task's training stream (None when the task has no stream)."""
    windows = getattr(task, "windows", None)
    ids = windows["train"].reshape(-1) if isinstance(windows, dict) and "train" in windows else None
    if ids is None and getattr(task, "tokens", None) is not None:
        ids = task.tokens.ids
    if ids is None:
        return None
    return torch.bincount(ids.long(), minlength=_vocab_size(task))


def load_counts(path: str | Path, task: Task) -> torch.Tensor:
    """Token counts from a file (`.npy` or whitespace-separated integers: the count of id i at
    position i, e.g. from the training corpus), padded with zeros to the task's vocabulary."""
    counts = read_int_file(path, "token-count file")
    vocab = _vocab_size(task)
    if len(counts) > vocab:
        raise ConfigError(f"{path}: {len(counts)} counts but task {task.name!r} has a vocabulary of {vocab}; "
                          "give one count per token id")
    return torch.nn.functional.pad(counts, (0, vocab - len(counts)))
