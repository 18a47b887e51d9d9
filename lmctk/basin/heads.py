"""Exact joint head matching: for one attention layer, the best head order and each head's own
within-head orders together (an inner LAP per head pair, all in one batched call, then one over heads),
so head order and within-head order never lock each other as coordinate descent from identity can."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lmctk.basin import lap
from lmctk.io import state_device
from lmctk.spec.core import Perms, PermutationSpec, coordinates, group_slices
from lmctk.spec.permute import permute_tensor

State = Mapping[str, torch.Tensor]


def gathered(tensor: torch.Tensor, axis: int, index: torch.Tensor | None) -> torch.Tensor:
    """`tensor` gathered along `axis` by `index` (None: as it is) as a [before, axis, after] view."""
    if index is not None:
        tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor.reshape(math.prod(tensor.shape[:axis]), tensor.shape[axis], math.prod(tensor.shape[axis + 1:]))


def rows(tensor: torch.Tensor, axis: int, index: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`tensor` gathered along `axis` by `index` (None: as it is), that axis first, as `rows` rows."""
    return gathered(tensor, axis, index).movedim(1, 0).reshape(rows, -1)


def head_step(
    spec: PermutationSpec, a: State, b: State, perms: Perms, block: str,
    users: list[tuple[str, int]], lap_backend: str = "auto", device: torch.device | None = None,
) -> tuple[Perms, list[str]]:
    """Joint best order of `block` (heads) and of its per-block groups (within-head dims), others fixed.

    Cost of pairing A's head e with B's head j = Σ of that pair's optimal within-head assignments
    (all pairs and groups of one size in one batched LAP) + the head's other slots; one outer LAP
    over heads then picks the pairs. Exact when no slot holds two within-head groups; tensors where
    they meet (GQA's o_proj: query head x v dim) are left out of the costs, and callers keep the step
    only if it raises the objective. Returns the proposed perms and the LAP backends used.
    """
    deps = [g for g, o in spec.blocks.items() if o == block and spec.groups[g] > 1]
    others = {g: p for g, p in perms.items() if g != block and g not in deps}
    n = spec.groups[block]
    device = device or state_device(a)
    C = torch.zeros(n, n, dtype=torch.float32, device=device)
    S = {g: torch.zeros(n, n, spec.groups[g], spec.groups[g], device=device) for g in deps}
    indices: dict = {}
    for key, axis in users:
        axes, layout = spec.axes[key], spec.axes[key][axis]
        _, coords = coordinates(layout, spec.groups)
        present = [g for g in deps if g in coords]
        held = sum(((coords[g][0] >= 0).long() for g in present), torch.zeros_like(coords[block][0]))
        if bool((held > 1).any()):
            continue
        ta = a[key].to(torch.float32)
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, others, indices, spec.blocks)
        slots = group_slices(layout, spec.groups, block)
        slots = slots[:, held[slots[0]] == 0].reshape(-1)  # a head's slots that no within-head group moves
        C += rows(ta, axis, slots, n) @ rows(tb, axis, slots, n).T
        for g in present:
            index = group_slices(layout, spec.groups, g, spec.blocks).reshape(-1)
            d = spec.groups[g]
            rows_a = rows(ta, axis, index, n * d).reshape(n, d, -1)
            rows_b = rows(tb, axis, index, n * d).reshape(n, d, -1)
            S[g] += torch.einsum("eir,jkr->ejik", rows_a, rows_b)
    inner: dict[str, torch.Tensor] = {}
    backends = []
    for d in sorted({spec.groups[g] for g in deps}):
        gs = [g for g in deps if spec.groups[g] == d]
        stacked = torch.stack([S[g] for g in gs])
        solved, info = lap.solve(stacked, maximize=True, backend=lap_backend, return_info=True)
        backends.append(info.backend)
        C += lap.objective(stacked, solved).sum(0).to(C.dtype)
        inner.update(zip(gs, solved))
    heads, info = lap.solve(C, maximize=True, backend=lap_backend, return_info=True)
    proposal = {block: heads.to(device)}
    proposal.update({g: p[torch.arange(n, device=p.device), heads.to(p.device)].to(device) for g, p in inner.items()})
    return proposal, [*backends, info.backend]
