"""The soup plan: everything that headers can tell, checked before a single tensor is read.

Keys and shapes must agree; float dtypes may differ (they are accumulated in fp32), other dtypes must
match. Tokenizer files are compared by SHA-256: a mismatch is an error unless `tokenizer_from` names
the ingredient whose tokenizer the soup gets. The plan also estimates peak memory and output size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.errors import ConfigError
from lmctk.io import (
    CheckpointInfo,
    TensorSlot,
    check_compatible,
    format_bytes,
    inspect_checkpoint,
    parse_size,
)
from lmctk.io.write import TOKENIZER_FILES, plan_shards

METHODS = ("uniform", "weighted", "greedy")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Ingredient:
    """One input checkpoint: as given, its header info (`info.path`: where its weights are), weight and tokenizer hashes."""

    path: Path
    info: CheckpointInfo
    weight: float = 1.0
    tokenizer: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    vocab_size: int | None = None

    @property
    def dir(self) -> Path | None:
        return self.info.path if self.info.path.is_dir() else None


@dataclass
class SoupPlan:
    """A checked soup: ingredients, normalised weights, output tensors and the estimates."""

    ingredients: list[Ingredient]
    method: str
    weights: list[float]  # normalised to sum to 1 (greedy: uniform over the kept ones)
    slots: list[TensorSlot]
    dtype: str | None  # output dtype of float tensors (None: as in the first ingredient)
    shard_size: int
    tokenizer_source: int | None  # ingredient index whose tokenizer/config files are copied
    peak_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ingredients": [
                {"path": str(i.path), "resolved": str(i.info.path), "format": i.info.format, "tensors": len(i.info.tensors),
                 "params": i.info.num_params, "bytes": i.info.total_bytes, "dtypes": sorted({t.dtype for t in i.info.tensors}),
                 "weight": w, "tokenizer": i.tokenizer}
                for i, w in zip(self.ingredients, self.weights)
            ],
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "tokenizer_source": None if self.tokenizer_source is None else str(self.ingredients[self.tokenizer_source].path),
            "estimated_peak_bytes": self.peak_bytes,
            "greedy_selection_bytes": self.selection_bytes,
            "output_bytes": self.output_bytes,
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from lmctk.render.text import short_path

        t = Table(title=f"{self.method} soup of {len(self.ingredients)} checkpoints (plan from headers)")
        tokenizers = any(ing.tokenizer for ing in self.ingredients)  # a column only when there is one to compare
        for column in ("#", "checkpoint", "format", "params", "dtypes", "bytes", *["tokenizer"] * tokenizers, "weight"):
            t.add_column(column, justify="left" if column in ("checkpoint", "format", "dtypes", "tokenizer") else "right")
        for n, (ing, w) in enumerate(zip(self.ingredients, self.weights), start=1):
            tok = hashlib.sha256(json.dumps(ing.tokenizer, sort_keys=True).encode()).hexdigest()[:8] if ing.tokenizer else "-"
            weight = "by val score" if self.method == "greedy" else f"{w:.4f}"
            t.add_row(str(n), short_path(ing.path, 20), ing.info.format, f"{ing.info.num_params:,}",
                      ", ".join(sorted({x.dtype for x in ing.info.tensors})), format_bytes(ing.info.total_bytes),
                      *[tok] * tokenizers, weight)
        lines = [
            (f"output: {len(self.slots)} tensors, {format_bytes(self.output_bytes)} as {self.dtype or 'input dtypes'}, "
             f"{self.num_shards} shard(s) of at most {format_bytes(self.shard_size)}"),
            f"estimated peak memory: {format_bytes(self.peak_bytes)} (one fp32 accumulator + one input tensor + one output tensor)",
        ]
        if self.method == "greedy":
            lines.append(f"greedy selection: about {format_bytes(self.selection_bytes)} more (the running fp32 sum, "
                         "one candidate and one trial average, plus the model being evaluated), then the write streams")
        return Group(t, Text("\n".join(lines)))

    def mix(self, kept: Sequence[int] | None = None) -> list[tuple[int, float]]:
        """The (ingredient index, raw weight) pairs the soup averages: the `kept` ones uniformly (greedy),
        else every ingredient with a positive weight (1.0 each for uniform, so it is exactly Σθᵢ/n)."""
        if kept is not None:
            return [(i, 1.0) for i in kept]
        return [(i, ing.weight) for i, ing in enumerate(self.ingredients) if ing.weight > 0]

    @property
    def selection_bytes(self) -> int:
        """Memory a greedy selection holds: fp32 sum, candidate, trial average and the evaluated model."""
        if self.method != "greedy":
            return 0
        fp32 = sum(s.nbytes // s.dtype.itemsize * 4 for s in self.slots)
        return 4 * fp32

    @property
    def num_shards(self) -> int:
        return len(plan_shards({s.name: s.nbytes for s in self.slots}, self.shard_size))


def plan_soup(
    paths: Sequence[str | os.PathLike],
    *,
    method: str = "uniform",
    weights: list[float] | None = None,
    dtype: str | None = None,
    tokenizer_from: str | None = None,
    shard_size: int | str = "2GB",
) -> SoupPlan:
    """Check the ingredients from headers only and plan the output; raises on any problem."""
    if method not in METHODS:
        raise ConfigError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if len(paths) < 2:
        raise ConfigError(f"checkpoints: a soup needs at least 2 ingredients, got {len(paths)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown {dtype!r}; choose one of {', '.join(DTYPES)}")
    weights = _weights(method, weights, len(paths))
    ingredients = [_ingredient(Path(p), w) for p, w in zip(paths, weights)]
    infos = [i.info for i in ingredients]
    check_compatible(infos)
    _check_dtypes(ingredients)
    source = _tokenizer_source(ingredients, tokenizer_from)
    slots = _slots(ingredients[0].info, dtype)
    total = sum(weights)
    size = parse_size(shard_size)
    return SoupPlan(
        ingredients, method, [w / total for w in weights], slots, dtype, size, source,
        _peak(ingredients, slots), sum(s.nbytes for s in slots),
    )


def _weights(method: str, weights: list[float] | None, n: int) -> list[float]:
    if method != "weighted":
        if weights is not None:
            raise ConfigError(f"--weights: only the weighted method takes weights (method is {method})")
        return [1.0] * n
    if weights is None:
        raise ConfigError("--weights: the weighted method needs one weight per checkpoint, e.g. --weights 0.5,0.3,0.2")
    if len(weights) != n:
        raise ConfigError(f"--weights: {len(weights)} weights for {n} checkpoints; give one per checkpoint")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--weights: {weights} must be finite and non-negative with a positive sum")
    return [float(w) for w in weights]


def _ingredient(path: Path, weight: float) -> Ingredient:
    info = inspect_checkpoint(path)
    resolved = info.path
    tokenizer: dict[str, str] = {}
    vocab = None
    if resolved.is_dir():
        for name in TOKENIZER_FILES:
            if (resolved / name).is_file():
                tokenizer[name] = hashlib.sha256((resolved / name).read_bytes()).hexdigest()
        if (resolved / "config.json").is_file():
            try:
                vocab = json.loads((resolved / "config.json").read_text()).get("vocab_size")
            except ValueError:
                raise ConfigError(f"{resolved / 'config.json'}: not valid JSON; fix or remove it") from None
    return Ingredient(path, info, weight, tokenizer, vocab)


def _check_dtypes(ingredients: list[Ingredient]) -> None:
    first = {t.name: t.dtype for t in ingredients[0].info.tensors}
    for n, ing in enumerate(ingredients[1:], start=2):
        for t in ing.info.tensors:
            a, b = first[t.name], t.dtype
            if a != b and not (_is_float(a) and _is_float(b)):
                raise ConfigError(f"{t.name}: dtype {a} in ingredient 1 vs {b} in ingredient {n}; only float tensors can be averaged across dtypes")


def _is_float(name: str) -> bool:
    return getattr(torch, name).is_floating_point


def _tokenizer_source(ingredients: list[Ingredient], tokenizer_from: str | None) -> int | None:
    """Index of the ingredient whose tokenizer/config the soup copies; raise on an unresolved mismatch."""
    vocabs = {i.vocab_size for i in ingredients if i.vocab_size is not None}
    differs = next((n for n, i in enumerate(ingredients[1:], start=1) if i.tokenizer != ingredients[0].tokenizer), None)
    if tokenizer_from is not None:
        return _named(ingredients, tokenizer_from)
    if len(vocabs) > 1:
        raise ConfigError(f"vocab_size differs between ingredients ({sorted(vocabs)}); they cannot be souped")
    if differs is not None:
        a, b = ingredients[0].tokenizer, ingredients[differs].tokenizer
        files = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ConfigError(
            f"tokenizer differs between ingredient 1 and {differs + 1} ({', '.join(files)}); "
            "pass --tokenizer-from N (the ingredient whose tokenizer the soup keeps) if they share a vocabulary"
        )
    return 0 if ingredients[0].dir else None


def _named(ingredients: list[Ingredient], name: str) -> int:
    if name.isdigit() and 1 <= int(name) <= len(ingredients):
        return int(name) - 1
    for n, ing in enumerate(ingredients):
        if Path(name) in (ing.path, ing.info.path) or Path(name).resolve() in (ing.path.resolve(), ing.info.path.resolve()):
            return n
    raise ConfigError(f"--tokenizer-from: {name!r} is not an ingredient; give its number (1..{len(ingredients)}) or path")


def _slots(info: CheckpointInfo, dtype: str | None) -> list[TensorSlot]:
    out = []
    for t in info.tensors:
        kind = getattr(torch, t.dtype)
        out.append(TensorSlot(t.name, t.shape, getattr(torch, dtype) if dtype and kind.is_floating_point else kind))
    return out


def _peak(ingredients: list[Ingredient], slots: list[TensorSlot]) -> int:
    """Largest per-tensor working set: fp32 accumulator + one input (+ its fp32 copy) + the output tensor."""
    largest_input: dict[str, int] = {}
    for ing in ingredients:
        for t in ing.info.tensors:
            largest_input[t.name] = max(largest_input.get(t.name, 0), t.nbytes)
    peak = 0
    for slot in slots:
        numel = slot.nbytes // max(slot.dtype.itemsize, 1)
        acc = numel * 4 if slot.dtype.is_floating_point else 0
        peak = max(peak, acc + largest_input[slot.name] + slot.nbytes)
    return peak

