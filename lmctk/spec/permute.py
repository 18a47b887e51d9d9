"""Permutations applied to tensors: a permuted copy (`permute_tensor`, `permute_state`), a permuted copy a
slab at a time (`permuted_slabs`, for sums that need never hold it whole) and in place (`permute_in_place`,
π(B) without a second copy of B). Every one gathers each axis by `core.axis_index`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from lmctk.metrics import CHUNK
from lmctk.spec.core import (
    NO_BLOCKS,
    Axes,
    Layout,
    Perms,
    PermutationSpec,
    axis_index,
    is_identity,
)


def _cached_index(layout: Layout, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor],
                  cache: dict | None, blocks: Mapping[str, str]) -> torch.Tensor | None:
    """`axis_index` of `layout`, or None where it is the identity; kept in `cache` (many tensors share a layout)."""
    if cache is not None and layout in cache:
        return cache[layout]
    index = axis_index(layout, groups, perms, blocks)
    index = None if is_identity(index) else index
    if cache is not None:
        cache[layout] = index
    return index


def permute_tensor(
    tensor: torch.Tensor, axes: Axes, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor],
    cache: dict | None = None, blocks: Mapping[str, str] = NO_BLOCKS,
) -> torch.Tensor:
    """`tensor` with each permuted axis re-ordered by `perms` (absent groups stay in place).

    Axes whose index is the identity are not gathered (no copy); `cache` keeps the index of each
    layout across the tensors of one call, since many tensors share a layout.
    """
    for axis, layout in enumerate(axes):
        index = None if layout is None else _cached_index(layout, groups, perms, cache, blocks)
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _slabs(tensor: torch.Tensor, along: int) -> Iterator[tuple[int, int]]:
    """(start, length) of consecutive slabs of `tensor` along axis `along`, each about CHUNK elements."""
    size = tensor.shape[along]
    step = max(1, CHUNK * size // max(1, tensor.numel()))
    for start in range(0, size, step):
        yield start, min(step, size - start)


def permuted_slabs(
    tensor: torch.Tensor, axes: Axes, groups: Mapping[str, int], perms: Mapping[str, torch.Tensor],
    cache: dict | None = None, blocks: Mapping[str, str] = NO_BLOCKS,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """`permute_tensor(tensor, ...)` a slab of about CHUNK elements at a time along its longest axis, as
    (axis, start, length, slab): slab == permute_tensor(...).narrow(axis, start, length), and the whole
    permuted copy is never held (a dot product with the 151936-row embedding of a Qwen2 needs one slab)."""
    along = max(range(tensor.dim()), key=lambda d: tensor.shape[d]) if tensor.dim() else 0
    view = tensor if tensor.dim() else tensor.reshape(1)
    indices = [None if layout is None else _cached_index(layout, groups, perms, cache, blocks) for layout in axes]
    indices += [None] * (view.dim() - len(indices))
    for start, length in _slabs(view, along):
        rows = indices[along]
        slab = view.narrow(along, start, length) if rows is None else view.index_select(
            along, rows[start:start + length].to(view.device))
        for axis, index in enumerate(indices):
            if axis != along and index is not None:
                slab = slab.index_select(axis, index.to(view.device))
        yield along, start, length, slab


def _gather_in_place(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> None:
    """tensor[..., :, ...] = tensor.index_select(axis, index), a slab of about CHUNK elements at a time:
    the slabs run along the tensor's longest other axis, which the gather does not mix."""
    others = [d for d in range(tensor.dim()) if d != axis]
    if not others:
        tensor.copy_(tensor.index_select(axis, index))
        return
    along = max(others, key=lambda d: tensor.shape[d])
    for start, length in _slabs(tensor, along):
        slab = tensor.narrow(along, start, length)
        slab.copy_(slab.index_select(axis, index))


def permute_in_place(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms) -> None:
    """Apply `perms` to `state`'s tensors in their own storage, so π(B) costs no second copy of B (scratch:
    one slab of about CHUNK elements). A tensor seen under several keys (tied weights) is permuted once."""
    cache: dict = {}
    done: set[tuple[int, tuple[int, ...]]] = set()
    for key, value in state.items():
        axes = spec.layout_of(key)
        if axes is None or (value.data_ptr(), tuple(value.shape)) in done:
            continue
        done.add((value.data_ptr(), tuple(value.shape)))
        for axis, layout in enumerate(axes):
            index = None if layout is None else _cached_index(layout, spec.groups, perms, cache, spec.blocks)
            if index is not None:
                _gather_in_place(value, axis, index.to(value.device))


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms) -> dict[str, torch.Tensor]:
    """Apply `perms` to every tensor the spec covers; other tensors are returned as they are."""
    cache: dict = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        axes = spec.layout_of(key)
        out[key] = value if axes is None else permute_tensor(value, axes, spec.groups, perms, cache, spec.blocks)
    return out
