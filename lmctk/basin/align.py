"""Permutation alignment by weight matching (Git Re-Basin); activation matching reuses its descent.

Weight matching maximises Σ_tensors <A, π(B)> by coordinate descent over permutation groups: for a
group g, S_g[i, j] = Σ over the tensors g acts on of <A's slice i, B's slice j>, with B already
permuted by every other group; the best perm for g is a linear assignment on S_g. Groups that share
no tensor do not influence each other's S, so each sweep solves them together in one batched LAP
call. The sweep order is seeded; the loop stops after a sweep with no improvement.
A group with per-block groups (heads and their within-head orders) is updated by one joint step:
every (A head, B head) pair's within-head assignments are solved in one batched LAP, and their optima
are the costs of one outer LAP over heads, so head order and within-head order are found together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.basin import lap
from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes, state_device, state_shapes
from lmctk.spec.core import (
    Perms,
    PermutationSpec,
    coordinates,
    group_slices,
    identity_perms,
    is_identity,
    permute_state,
    permute_tensor,
)

State = Mapping[str, torch.Tensor]


@dataclass
class MatchResult:
    """Permutations that map B onto A, with the objective trace and where the time went."""

    perms: Perms
    method: str
    objective: list[float]  # Σ <A, π(B)> after each sweep (index 0: before any update)
    sweeps: int
    seconds: float
    lap_seconds: float = 0.0
    similarity_seconds: float = 0.0
    lap_backends: list[str] = field(default_factory=list)
    unpermuted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "objective": self.objective,
            "sweeps": self.sweeps,
            "seconds": self.seconds,
            "lap_seconds": self.lap_seconds,
            "similarity_seconds": self.similarity_seconds,
            "lap_backends": sorted(set(self.lap_backends)),
            "unpermuted": self.unpermuted,
            "groups": {g: p.shape[-1] for g, p in self.perms.items()},
            "moved": {g: int((p != torch.arange(p.shape[-1], device=p.device)).sum()) for g, p in self.perms.items()},
        }

    def __rich__(self):
        from rich.table import Table

        d = self.to_dict()
        t = Table(title=self.method.replace("_", " "),
                  caption=f"{self.sweeps} sweeps in {self.seconds:.2f} s (LAP {self.lap_seconds:.2f} s, "
                          f"similarity {self.similarity_seconds:.2f} s)")
        t.add_column("group")
        t.add_column("size", justify="right")
        t.add_column("moved", justify="right")
        for g, n in d["groups"].items():
            t.add_row(g, str(n), str(d["moved"][g]))
        return t


def _rows(tensor: torch.Tensor, axis: int, index: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`tensor` gathered along `axis` by `index` (None: as it is), that axis first, as `rows` rows."""
    if index is not None:  # gather along the original (contiguous) axis, then bring it to the front
        tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor.movedim(axis, 0).reshape(rows, -1)


def _slices(spec: PermutationSpec, tensor: torch.Tensor, axes, axis: int, group: str, cache: dict) -> torch.Tensor:
    """The tensor with `group`'s elements as rows: [n_group, everything else] ([n_block * n_group, …] per block)."""
    key = (axes[axis], group)
    if key not in cache:
        flat = group_slices(axes[axis], spec.groups, group, spec.blocks).reshape(-1)
        cache[key] = None if is_identity(flat) else flat
    rows = spec.groups[group] * (spec.groups[spec.blocks[group]] if group in spec.blocks else 1)
    return _rows(tensor, axis, cache[key], rows)


def similarity(
    spec: PermutationSpec, a: State, b: State, perms: Perms, group: str,
    users: list[tuple[str, int]] | None = None,
) -> torch.Tensor:
    """S[i, j] = Σ <A slice i, π_{-g}(B) slice j> over the tensors `group` acts on (fp32).

    A per-block group gets one matrix per block: S[e, i, j]. `users` is `spec.users()[group]`,
    passed by callers that compute the inverse map once.
    """
    users = spec.users()[group] if users is None else users
    others = {g: p for g, p in perms.items() if g != group}
    n = spec.groups[group]
    blocks = spec.groups[spec.blocks[group]] if group in spec.blocks else 1
    S = torch.zeros(blocks, n, n, dtype=torch.float32, device=state_device(a))
    slices: dict = {}
    indices: dict = {}
    for key, axis in users:
        axes = spec.axes[key]
        ta = _slices(spec, a[key].to(torch.float32), axes, axis, group, slices)
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, others, indices, spec.blocks)
        tb = _slices(spec, tb, axes, axis, group, slices)
        S += ta.reshape(blocks, n, -1) @ tb.reshape(blocks, n, -1).transpose(1, 2)
    return S if group in spec.blocks else S[0]


def objective(spec: PermutationSpec, a: State, b: State, perms: Perms, keys: set[str] | None = None) -> float:
    """Σ over spec'd parameters (tied aliases once, buffers never; only `keys` if given) of <A, π(B)>."""
    total = 0.0
    indices: dict = {}
    for key, axes in spec.axes.items():
        if key in spec.buffers or (keys is not None and key not in keys):
            continue
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, perms, indices, spec.blocks)
        total += float((a[key].to(torch.float32) * tb).sum())
    return total


def independent_rounds(
    spec: PermutationSpec, order: list[str], neighbours: dict[str, set[str]] | None = None
) -> list[list[str]]:
    """Split a sweep order into rounds of groups that share no tensor (solved in one batch)."""
    nbrs = spec.neighbours() if neighbours is None else neighbours
    rounds: list[list[str]] = []
    for g in order:
        if rounds and not (nbrs[g] & set(rounds[-1])):
            rounds[-1].append(g)
        else:
            rounds.append([g])
    return rounds


def head_step(
    spec: PermutationSpec, a: State, b: State, perms: Perms, block: str,
    users: list[tuple[str, int]], lap_backend: str = "auto",
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
    device = state_device(a)
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
        C += _rows(ta, axis, slots, n) @ _rows(tb, axis, slots, n).T
        for g in present:
            index = group_slices(layout, spec.groups, g, spec.blocks).reshape(-1)
            d = spec.groups[g]
            rows_a = _rows(ta, axis, index, n * d).reshape(n, d, -1)
            rows_b = _rows(tb, axis, index, n * d).reshape(n, d, -1)
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


def solve_round(spec: PermutationSpec, S: dict[str, torch.Tensor], perms: Perms, lap_backend: str,
                tol: float) -> list[str]:
    """One batched LAP per group size over the similarities `S` of independent groups; a group's
    permutation is replaced only when its assignment strictly improves. Returns the backends used."""
    by_size: dict[int, list[str]] = {}
    for g in S:
        by_size.setdefault(spec.groups[g], []).append(g)
    backends = []
    for gs in by_size.values():
        n = spec.groups[gs[0]]
        stacked = torch.cat([S[g].reshape(-1, n, n) for g in gs])
        new, info = lap.solve(stacked, maximize=True, backend=lap_backend, return_info=True)
        backends.append(info.backend)
        for g, p_new in zip(gs, new.split([S[g].reshape(-1, n, n).shape[0] for g in gs])):
            p_new = p_new.reshape(perms[g].shape)
            old_score = float(lap.objective(S[g], perms[g]).sum())
            if float(lap.objective(S[g], p_new).sum()) > old_score + tol * max(1.0, abs(old_score)):
                perms[g] = p_new.to(perms[g].device)
    return backends


def weight_matching(
    spec: PermutationSpec,
    a: State,
    b: State,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init: Perms | None = None,
    tol: float = 1e-12,
    lap_backend: str = "auto",
) -> MatchResult:
    """Permutations of B's groups that maximise Σ <A, π(B)> (Ainsworth et al. 2023, weight matching).

    Similarities accumulate in fp32 on the states' device (bf16/fp16 inputs are fine); LAPs run on
    the backend `lap.solve` picks. Each sweep never lowers the objective; the trace is returned.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter: must be at least 1, got {max_iter}")
    assert_same_shapes(a, b, "model A", "model B")
    spec.validate(state_shapes(a))
    start = time.perf_counter()
    device = state_device(a)
    perms = {g: p.to(device) for g, p in (init or identity_perms(spec)).items()}
    rng = random.Random(seed)
    users, neighbours = spec.users(), spec.neighbours()  # derived once, not per group and sweep
    block_keys = {b: {key for key, _ in users[b]} for b in set(spec.blocks.values())}
    trace = [objective(spec, a, b, perms)]
    lap_time = sim_time = 0.0
    backends: list[str] = []
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        order = sorted(spec.groups)
        rng.shuffle(order)
        for round_ in independent_rounds(spec, order, neighbours):
            for g in (g for g in round_ if g in block_keys):  # heads with their within-head groups, jointly
                t0 = time.perf_counter()
                proposal, used = head_step(spec, a, b, perms, g, users[g], lap_backend)
                lap_time += time.perf_counter() - t0
                backends += used
                before = objective(spec, a, b, perms, block_keys[g])
                if objective(spec, a, b, {**perms, **proposal}, block_keys[g]) > before + tol * max(1.0, abs(before)):
                    perms.update(proposal)
            t0 = time.perf_counter()
            S = {g: similarity(spec, a, b, perms, g, users[g]) for g in round_ if g not in block_keys}
            sim_time += time.perf_counter() - t0
            t0 = time.perf_counter()
            backends += solve_round(spec, S, perms, lap_backend, tol)
            lap_time += time.perf_counter() - t0
        trace.append(objective(spec, a, b, perms))
        if trace[-1] <= trace[-2] + tol * max(1.0, abs(trace[-2])):
            break
    return MatchResult(
        perms={g: p.cpu() for g, p in perms.items()},
        method="weight_matching",
        objective=trace,
        sweeps=sweeps,
        seconds=time.perf_counter() - start,
        lap_seconds=lap_time,
        similarity_seconds=sim_time,
        lap_backends=backends,
        unpermuted=spec.unpermuted(a.keys()),
    )


def apply(spec: PermutationSpec, state: State, result: MatchResult | Perms) -> dict[str, torch.Tensor]:
    """B permuted into A's neuron order."""
    perms = result.perms if isinstance(result, MatchResult) else result
    return permute_state(state, spec, perms)


def save_aligned(
    spec: PermutationSpec,
    b: State,
    perms: MatchResult | Perms,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write π(B) as an HF model dir, one tensor at a time (B may be a LazyState or a view of one), with B's
    `config.json` and tokenizer files copied from `source_dir`. Tensors keep B's stored names; tied
    aliases B's checkpoint omits are omitted again (`io.keys.stored_names`)."""
    from lmctk.io import TensorSlot, stored_names, stream_hf_dir
    from lmctk.io.write import side_files

    perms = perms.perms if isinstance(perms, MatchResult) else perms
    shapes, names = state_shapes(b), stored_names(b)
    dtypes = b.dtypes if hasattr(b, "dtypes") else {k: b[k].dtype for k in names}
    slots = [TensorSlot(stored, tuple(shapes[key]), dtypes[key]) for key, stored in names.items()]
    key_of = {stored: key for key, stored in names.items()}
    files = {f.name: f.read_bytes() for f in side_files(Path(source_dir))} if source_dir else {}
    view = PermutedView(spec, b, perms)
    return stream_hf_dir(out_dir, slots, lambda name: view[key_of[name]].contiguous(), shard_size=shard_size,
                         files=files, overwrite=overwrite)


class PermutedView(Mapping):
    """π(B) computed tensor by tensor on access, so streaming code never materialises it whole."""

    def __init__(self, spec: PermutationSpec, state: State, perms: Perms) -> None:
        self.spec, self.state, self.perms = spec, state, perms

    def __getitem__(self, key: str) -> torch.Tensor:
        axes = self.spec.layout_of(key)
        value = self.state[key]
        return value if axes is None else permute_tensor(value, axes, self.spec.groups, self.perms,
                                                         blocks=self.spec.blocks)

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)
