"""PermutationSpec: which permutation group acts on which axis of every tensor in a state.

An axis is described by a *layout*, a small tree:
- a group name (`"res"`): the whole axis is one group's positions;
- `Fixed(n)`: n positions that no permutation moves (e.g. the q|k|v chunk index, RoPE dims);
- `Prod(a, b, …)`: a row-major product, e.g. `Prod("heads.0", "hd.0")` for an axis laid out as
  (head, within-head) — the head group moves whole blocks, the within-head group moves inside each;
- `Cat(a, b, …)`: a concatenation, e.g. GPT-2's fused `c_attn` output q|k|v.
With these, head blocks, fused and interleaved tensors and plain layers are one mechanism: the
permuted index of an axis and the per-group slices used by weight matching are derived from the
layout, never written by hand. Convention: `permute(B)[i] = B[perm[i]]` along every axis a group
acts on, so a perm returned by a maximising LAP on S[i, j] = <A_i, B_j> maps B onto A.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

import torch

from lmctk.errors import ConfigError, KeyMismatchError, ShapeMismatchError


@dataclass(frozen=True)
class Fixed:
    """`size` positions that stay in place."""

    size: int


@dataclass(frozen=True)
class Prod:
    """Row-major product of sub-layouts (the first part varies slowest)."""

    parts: tuple["Layout", ...]

    def __init__(self, *parts: "Layout") -> None:
        object.__setattr__(self, "parts", tuple(parts))


@dataclass(frozen=True)
class Cat:
    """Concatenation of sub-layouts along the axis."""

    parts: tuple["Layout", ...]

    def __init__(self, *parts: "Layout") -> None:
        object.__setattr__(self, "parts", tuple(parts))


Layout = Union[str, Fixed, Prod, Cat]
Axes = tuple[Union[Layout, None], ...]
Perms = dict[str, torch.Tensor]


@dataclass
class PermutationSpec:
    """Groups with sizes, the layout of every permuted tensor axis, and tied aliases.

    `axes[key]` has one entry per tensor dimension (None: not permuted). Keys absent from `axes`
    (and not tied) are left unpermuted; `unpermuted(state)` lists them so nothing is silent.
    `tied[alias] = key` declares shared storage (e.g. `lm_head.weight` = `wte.weight`): the alias
    is permuted like its key but counted once by weight matching.
    """

    groups: dict[str, int]
    axes: dict[str, Axes]
    tied: dict[str, str] = field(default_factory=dict)
    name: str = ""
    buffers: frozenset[str] = field(default=frozenset(), compare=False)  # permuted, never matched (running stats)

    def __post_init__(self) -> None:
        for key, axes in self.axes.items():
            for layout in axes:
                for g in groups_in(layout) if layout is not None else ():
                    if g not in self.groups:
                        raise ConfigError(f"spec {self.name}: tensor {key} uses undefined group '{g}'")
        for alias, key in self.tied.items():
            if key not in self.axes:
                raise ConfigError(f"spec {self.name}: tied alias {alias} points to {key}, which has no axes")

    def layout_of(self, key: str) -> Axes | None:
        return self.axes.get(self.tied.get(key, key))

    def users(self) -> dict[str, list[tuple[str, int]]]:
        """Inverse map: group -> [(parameter key, axis)] where it acts (tied aliases and buffers excluded)."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.groups}
        for key, axes in self.axes.items():
            if key in self.buffers:
                continue
            for axis, layout in enumerate(axes):
                if layout is not None:
                    for g in sorted(set(groups_in(layout))):
                        out[g].append((key, axis))
        return out

    def neighbours(self) -> dict[str, set[str]]:
        """Groups that share at least one tensor with each group (they must be solved in turn)."""
        out: dict[str, set[str]] = {g: set() for g in self.groups}
        for axes in self.axes.values():
            gs = {g for layout in axes if layout is not None for g in groups_in(layout)}
            for g in gs:
                out[g] |= gs - {g}
        return out

    def validate(self, shapes: Mapping[str, Iterable[int]]) -> None:
        """Check every spec'd tensor exists with axis sizes that match its layout (a tied alias may be absent:
        checkpoints store one member of a tie, and `io.keys` reads the others from it)."""
        missing = [k for k in self.axes if k not in shapes]
        if missing:
            raise KeyMismatchError(
                f"the state lacks {len(missing)} tensor(s) that spec {self.name} permutes "
                f"(e.g. {', '.join(missing[:3])}); use the spec of the checkpoint's own architecture"
            )
        for key in [*self.axes, *(k for k in self.tied if k in shapes)]:
            shape = tuple(shapes[key])
            axes = self.layout_of(key)
            if len(axes) != len(shape):
                raise ShapeMismatchError(key, shape, tuple("?" for _ in axes), where=f"spec {self.name} gives {len(axes)} axes")
            expected = tuple(n if layout is None else layout_size(layout, self.groups) for n, layout in zip(shape, axes))
            if expected != shape:
                raise ShapeMismatchError(key, shape, expected, where=f"state vs spec {self.name}")

    def unpermuted(self, keys: Iterable[str]) -> list[str]:
        """Keys of a state that no group acts on (reported, never silently assumed)."""
        out = []
        for k in keys:
            axes = self.layout_of(k)
            if axes is None or all(a is None for a in axes):
                out.append(k)
        return out


def groups_in(layout: Layout) -> list[str]:
    """Every group named in a layout (in order of appearance)."""
    if isinstance(layout, str):
        return [layout]
    if isinstance(layout, Fixed):
        return []
    return [g for part in layout.parts for g in groups_in(part)]


def layout_size(layout: Layout, groups: Mapping[str, int]) -> int:
    """Number of positions the layout spans."""
    if isinstance(layout, str):
        return groups[layout]
    if isinstance(layout, Fixed):
        return layout.size
    sizes = [layout_size(p, groups) for p in layout.parts]
    if isinstance(layout, Prod):
        out = 1
        for s in sizes:
            out *= s
        return out
    return sum(sizes)


def axis_index(layout: Layout, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Source position of every output position: `permuted = x.index_select(axis, index)`.

    Groups absent from `perms` stay in place.
    """
    if isinstance(layout, str):
        perm = perms.get(layout)
        return perm.long().cpu() if perm is not None else torch.arange(groups[layout])
    if isinstance(layout, Fixed):
        return torch.arange(layout.size)
    parts = [axis_index(p, groups, perms) for p in layout.parts]
    if isinstance(layout, Cat):
        out, offset = [], 0
        for idx in parts:
            out.append(idx + offset)
            offset += idx.numel()
        return torch.cat(out)
    index = torch.zeros(1, dtype=torch.long)
    for idx in parts:
        index = (index[:, None] * idx.numel() + idx[None, :]).reshape(-1)
    return index


def _coordinates(layout: Layout, groups: Mapping[str, int], group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position: the element of `group` it belongs to (-1 if none) and its position with
    that element set to 0 (positions sharing this 'base' are the same slot of different elements)."""
    if isinstance(layout, str):
        n = groups[layout]
        if layout == group:
            return torch.arange(n), torch.zeros(n, dtype=torch.long)
        return torch.full((n,), -1), torch.arange(n)
    if isinstance(layout, Fixed):
        return torch.full((layout.size,), -1), torch.arange(layout.size)
    parts = [_coordinates(p, groups, group) for p in layout.parts]
    if isinstance(layout, Cat):
        elems, bases, offset = [], [], 0
        for elem, base in parts:
            elems.append(elem)
            bases.append(base + offset)
            offset += elem.numel()
        return torch.cat(elems), torch.cat(bases)
    elem = torch.full((1,), -1)
    base = torch.zeros(1, dtype=torch.long)
    for e, b in parts:
        n = e.numel()
        elem = torch.maximum(elem[:, None], e[None, :]).reshape(-1)  # a group occurs once per path
        base = (base[:, None] * n + b[None, :]).reshape(-1)
    return elem, base


def group_slices(layout: Layout, groups: Mapping[str, int], group: str) -> torch.Tensor:
    """Positions of each element of `group` on this axis: LongTensor [n_group, slots].

    Row i lists element i's positions in a fixed slot order shared by all rows, so
    `x.index_select(axis, s.reshape(-1))` viewed as [n_group, slots] lines elements up.
    """
    elem, base = _coordinates(layout, groups, group)
    n = groups[group]
    pos = torch.nonzero(elem >= 0).squeeze(1)
    order = torch.argsort(base[pos] * n + elem[pos])
    return pos[order].reshape(-1, n).T.contiguous()


def is_identity(index: torch.Tensor) -> bool:
    """Whether an index leaves every position in place (so gathering by it would only copy)."""
    return bool(torch.equal(index.cpu(), torch.arange(index.numel())))


def permute_tensor(
    tensor: torch.Tensor, axes: Axes, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor],
    cache: dict | None = None,
) -> torch.Tensor:
    """`tensor` with each permuted axis re-ordered by `perms` (absent groups stay in place).

    Axes whose index is the identity are not gathered (no copy); `cache` keeps the index of each
    layout across the tensors of one call, since many tensors share a layout.
    """
    for axis, layout in enumerate(axes):
        if layout is None:
            continue
        if cache is None or layout not in cache:
            index = axis_index(layout, groups, perms)
            index = None if is_identity(index) else index
            if cache is not None:
                cache[layout] = index
        else:
            index = cache[layout]
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms) -> dict[str, torch.Tensor]:
    """Apply `perms` to every tensor the spec covers; other tensors are returned as they are."""
    cache: dict = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        axes = spec.layout_of(key)
        out[key] = value if axes is None else permute_tensor(value, axes, spec.groups, perms, cache)
    return out


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None, *, moving: bool = False) -> Perms:
    """One uniformly random permutation per group; `moving=True` never returns the identity for n >= 2."""
    out = {}
    for g, n in spec.groups.items():
        perm = torch.randperm(n, generator=generator)
        if moving and n >= 2 and torch.equal(perm, torch.arange(n)):
            perm = torch.roll(perm, 1)
        out[g] = perm
    return out


def identity_perms(spec: PermutationSpec) -> Perms:
    return {g: torch.arange(n) for g, n in spec.groups.items()}


def invert(perms: Perms) -> Perms:
    """Inverse permutations: permuting by `perms` then by `invert(perms)` is the identity."""
    return {g: torch.argsort(p) for g, p in perms.items()}
