"""PermutationSpec: which permutation group acts on which axis of every tensor in a state.

An axis is described by a *layout*, a small tree:
- a group name (`"res"`): the whole axis is one group's positions;
- `Fixed(n)`: n positions that no permutation moves (e.g. the q|k|v chunk index, RoPE dims);
- `Prod(a, b, …)`: a row-major product, e.g. `Prod("heads.0", "hd.0")` for an axis laid out as
  (head, within-head) — the head group moves whole blocks, the within-head group moves inside each;
- `Cat(a, b, …)`: a concatenation, e.g. GPT-2's fused `c_attn` output q|k|v.
With these, head blocks, fused and interleaved tensors and plain layers are one mechanism: the
permuted index of an axis and the per-group slices used by weight matching are derived from the
layout, never written by hand.
A group may be *per block*: `blocks["qk.0"] = "heads.0"` makes `qk.0` one independent permutation per
element of `heads.0` (block-diagonal; its perm is `[n_heads, d]`), so every head has its own q/k order.
Its rows are indexed by the block's *output* position: `permuted[h, i] = B[heads[h], qk[h, i]]`.
Convention: `permute(B)[i] = B[perm[i]]` along every axis a group
acts on, so a perm returned by a maximising LAP on S[i, j] = <A_i, B_j> maps B onto A.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
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
NO_BLOCKS: Mapping[str, str] = MappingProxyType({})


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
    blocks: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, axes in self.axes.items():
            for layout in axes:
                for g in groups_in(layout) if layout is not None else ():
                    if g not in self.groups:
                        raise ConfigError(f"spec {self.name}: tensor {key} uses undefined group '{g}'")
        for g, b in self.blocks.items():
            if g not in self.groups or b not in self.groups or b in self.blocks:
                raise ConfigError(f"spec {self.name}: per-block group {g} -> {b} needs two defined groups, one level deep")
        for key, axes in self.axes.items():
            for layout in axes:
                if layout is not None and set(groups_in(layout)) & set(self.blocks):
                    _, coords = coordinates(layout, self.groups)
                    for g in set(coords) & set(self.blocks):
                        b = self.blocks[g]
                        if b not in coords or bool((coords[b][0][coords[g][0] >= 0] < 0).any()):
                            raise ConfigError(f"spec {self.name}: tensor {key} places {g} outside a block of {self.blocks[g]}")
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


def coordinates(layout: Layout, groups: Mapping[str, int]) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The axis size, and per group: its element at every position (-1 where absent) and its stride there.

    A position is an affine function of its group elements (`pos = offset + Σ_g elem_g * stride_g`),
    so moving a group's element by Δ moves the position by Δ * stride: permuting is one gather.
    """
    if isinstance(layout, str):
        n = groups[layout]
        return n, {layout: (torch.arange(n), torch.ones(n, dtype=torch.long))}
    if isinstance(layout, Fixed):
        return layout.size, {}
    parts = [coordinates(p, groups) for p in layout.parts]
    names = {g for _, c in parts for g in c}
    if isinstance(layout, Cat):
        size = sum(n for n, _ in parts)
        out = {}
        for g in names:
            filled = [c.get(g, (torch.full((n,), -1), torch.zeros(n, dtype=torch.long))) for n, c in parts]
            out[g] = (torch.cat([e for e, _ in filled]), torch.cat([s for _, s in filled]))
        return size, out
    size = 1
    for n, _ in parts:
        size *= n
    pos, stride, out = torch.arange(size), size, {}
    for n, c in parts:
        stride //= n
        digit = (pos // stride) % n
        for g, (elem, step) in c.items():
            out[g] = (elem[digit], step[digit] * stride)
    return size, out


def axis_index(layout: Layout, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor],
               blocks: Mapping[str, str] = NO_BLOCKS) -> torch.Tensor:
    """Source position of every output position: `permuted = x.index_select(axis, index)`.

    Groups absent from `perms` stay in place; a per-block perm `[n_block, n]` uses the row of the
    block element at each output position.
    """
    size, coords = coordinates(layout, groups)
    index = torch.arange(size)
    for g, (elem, stride) in coords.items():
        perm = perms.get(g)
        if perm is None:
            continue
        at = elem >= 0
        perm = perm.long().cpu()
        source = perm[coords[blocks[g]][0][at], elem[at]] if perm.ndim == 2 else perm[elem[at]]
        index[at] += (source - elem[at]) * stride[at]
    return index


def group_slices(layout: Layout, groups: Mapping[str, int], group: str, blocks: Mapping[str, str] = NO_BLOCKS
                 ) -> torch.Tensor:
    """Positions of each element of `group` on this axis: LongTensor [n_group, slots].

    Row i lists element i's positions in a fixed slot order shared by all rows, so
    `x.index_select(axis, s.reshape(-1))` viewed as [n_group, slots] lines elements up. A per-block
    group has `n_block * n_group` rows, block-major (row e * n + i: element i of block e).
    """
    size, coords = coordinates(layout, groups)
    elem, stride = coords[group]
    base = torch.arange(size) - elem * stride
    n = groups[group]
    if group in blocks:
        b_elem, b_stride = coords[blocks[group]]
        base = base - b_elem * b_stride
        elem = torch.where(elem >= 0, b_elem * n + elem, -1)
        n *= groups[blocks[group]]
    pos = torch.nonzero(elem >= 0).squeeze(1)
    order = torch.argsort(base[pos] * n + elem[pos])
    return pos[order].reshape(-1, n).T.contiguous()


def gather_index(layout: Layout, groups: Mapping[str, int], group: str, blocks: Mapping[str, str] = NO_BLOCKS
                 ) -> torch.Tensor | None:
    """`group_slices` flattened: the index that lines `group`'s slices up along an axis, or None where they
    already are (reading them is a view, not a gathered copy)."""
    flat = group_slices(layout, groups, group, blocks).reshape(-1)
    return None if is_identity(flat) else flat


def is_identity(index: torch.Tensor) -> bool:
    """Whether an index leaves every position in place (so gathering by it would only copy)."""
    return bool(torch.equal(index.cpu(), torch.arange(index.numel())))


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None, *, moving: bool = False) -> Perms:
    """One uniformly random permutation per group (per block for per-block groups, drawn independently);
    `moving=True` never returns the identity for n >= 2."""
    out = {}
    for g, n in spec.groups.items():
        rows = []
        for _ in range(spec.groups[spec.blocks[g]] if g in spec.blocks else 1):
            perm = torch.randperm(n, generator=generator)
            if moving and n >= 2 and torch.equal(perm, torch.arange(n)):
                perm = torch.roll(perm, 1)
            rows.append(perm)
        out[g] = torch.stack(rows) if g in spec.blocks else rows[0]
    return out


def identity_perms(spec: PermutationSpec) -> Perms:
    return {g: torch.arange(n).repeat(spec.groups[spec.blocks[g]], 1) if g in spec.blocks else torch.arange(n)
            for g, n in spec.groups.items()}


def invert(perms: Perms, spec: PermutationSpec | None = None) -> Perms:
    """Inverse permutations: permuting by `perms` then by `invert(perms, spec)` is the identity.

    Per-block perms are re-indexed by the block's new order, so they need the spec that declares them.
    """
    blocks = spec.blocks if spec is not None else {}
    out = {}
    for g, p in perms.items():
        if p.ndim == 2 and g not in blocks:
            raise ConfigError(f"invert: {g} holds per-block perms; pass the spec that declares its block")
        if p.ndim == 2 and blocks[g] in perms:
            p = p[torch.argsort(perms[blocks[g]])]
        out[g] = torch.argsort(p, dim=-1)
    return out


def shared_within(spec: PermutationSpec) -> PermutationSpec:
    """`spec` with every per-block group shared by all blocks (the coarser symmetry of older specs)."""
    return dataclasses.replace(spec, blocks={})


def _layout_json(layout: Layout | None):
    """A layout as plain JSON (None, a group name, or [kind, parts…]), independent of its Python repr."""
    if layout is None or isinstance(layout, str):
        return layout
    if isinstance(layout, Fixed):
        return ["fixed", layout.size]
    return ["prod" if isinstance(layout, Prod) else "cat", *(_layout_json(p) for p in layout.parts)]


def spec_hash(spec: PermutationSpec) -> str:
    """A stable fingerprint of what a set of permutations means: groups and sizes, per-block groups, every
    tensor's axis layouts and tied aliases (not the spec's name). Saved permutations carry it, so they
    are applied only to checkpoints whose spec has the same one."""
    payload = {"groups": spec.groups, "blocks": spec.blocks, "tied": spec.tied,
               "axes": {key: [_layout_json(layout) for layout in axes] for key, axes in spec.axes.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
