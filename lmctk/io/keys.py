"""Stored tensor names vs a model's state keys: the one place where tied and renamed tensors are handled.

A checkpoint saved by `transformers` stores each tied parameter once (GPT-2 keeps `transformer.wte.weight`,
not `lm_head.weight`) and may store a tensor under an older name (GPT-NeoX's `embed_out.` is the model's
`lm_head.`). `KeyMap` knows a model's keys, its tie groups and those renames; `KeyMap.view(state)` shows a
stored state under the model's keys with absent tied aliases read from the stored member. Writers
iterate `stored_names(view)`, so an output stores (and omits) exactly what its input did.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmctk.io.lazy import state_device, state_shapes


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one object (tied weights), each group in state_dict order."""
    order = {k: i for i, k in enumerate(model.state_dict(keep_vars=True))}
    by_id: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(key)
    return [sorted(keys, key=lambda k: order.get(k, len(order))) for keys in by_id.values() if len(keys) > 1]


@dataclass(frozen=True)
class KeyMap:
    """A model's state keys, its tie groups and the renames (regex, replacement) from stored names."""

    keys: frozenset[str]
    ties: tuple[tuple[str, ...], ...] = ()
    renames: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> KeyMap:
        """The key map of `model` (on any device, meta included); renames are transformers' checkpoint conversions."""
        return cls(frozenset(model.state_dict(keep_vars=True)), tuple(map(tuple, tied_groups(model))), _renames(model))

    def model_key(self, stored: str) -> str:
        """The model key a stored name loads into (itself unless a rename turns it into a model key)."""
        if stored in self.keys:
            return stored
        for pattern, replacement in self.renames:
            renamed = re.sub(pattern, replacement, stored)
            if renamed in self.keys:
                return renamed
        return stored

    def view(self, state: Mapping[str, torch.Tensor]) -> StateView:
        return StateView(state, self)


class StateView(Mapping[str, torch.Tensor]):
    """A stored state under its model's keys: renamed, and tied aliases the file omits read from their stored member.

    Lazy like the state it wraps (a LazyState stays one tensor at a time); `dict(view)` materialises it.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], keys: KeyMap) -> None:
        self.state = state
        self.stored = {keys.model_key(name): name for name in state}  # model key -> stored name
        self.filled: dict[str, str] = {}  # tied alias the state omits -> stored member of its group
        for group in keys.ties:
            present = [k for k in group if k in self.stored]
            self.filled.update({k: self.stored[present[0]] for k in group if present and k not in self.stored})

    def name_of(self, key: str) -> str:
        """The stored name `key` is read from."""
        return self.stored[key] if key in self.stored else self.filled[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.stored and key not in self.filled:
            raise KeyError(key)
        return self.state[self.name_of(key)]

    def __iter__(self) -> Iterator[str]:
        yield from self.stored
        yield from self.filled

    def __len__(self) -> int:
        return len(self.stored) + len(self.filled)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        stored = state_shapes(self.state)
        return {k: stored[self.name_of(k)] for k in self}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        dtypes = getattr(self.state, "dtypes", None) or {k: v.dtype for k, v in self.state.items()}
        return {k: dtypes[self.name_of(k)] for k in self}

    @property
    def device(self) -> torch.device:
        return state_device(self.state)


def stored_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Model key -> stored name of every tensor a checkpoint of `state` stores (a plain state: itself;
    a view of a StateView, such as a permuted one, exposes its `stored`)."""
    stored = getattr(state, "stored", None)
    return dict(stored) if isinstance(stored, Mapping) else {k: k for k in state}


def _renames(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """transformers' renames from stored names to this model's keys (`embed_out.` -> `lm_head.`); none for other models."""
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return ()
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    out: list[tuple[str, str]] = []
    for transform in get_model_conversion_mapping(model):
        if isinstance(transform, WeightRenaming):
            targets: Sequence[str] = transform.target_patterns
            out += [(source, targets[0]) for source in transform.source_patterns]
    return tuple(out)
